"""Names that cross every boundary: tenants, instance ids and module digests."""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

# Tenant names become the first word of routing keys and broker user names, so they stay
# in a conservative alphabet with no dots (a dot would split the routing key).
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"

_TENANT = re.compile(TENANT_PATTERN)
_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)
_DIGEST = re.compile(DIGEST_PATTERN)


class InstanceKey(NamedTuple):
    """An instance is named by its tenant and an id unique within that tenant."""

    tenant: str
    instance_id: str


def is_tenant(value: str) -> bool:
    """Tell whether `value` is a well-formed tenant name."""
    return _TENANT.fullmatch(value) is not None


def is_instance_id(value: str) -> bool:
    """Tell whether `value` is a well-formed instance id."""
    return _INSTANCE_ID.fullmatch(value) is not None


def is_digest(value: str) -> bool:
    """Tell whether `value` is a well-formed module digest (`sha256:` and 64 hex digits)."""
    return _DIGEST.fullmatch(value) is not None


def digest_of(wasm: bytes) -> str:
    """Return the content address of a module's bytes."""
    return "sha256:" + hashlib.sha256(wasm).hexdigest()
