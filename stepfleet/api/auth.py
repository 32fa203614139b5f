"""API tokens: roles, secrets, and who a request is.

A token has a name, a role and optionally a tenant. Its secret (`sft_` and 43 URL-safe
characters, 256 random bits) is shown once; the store keeps its SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

SECRET_PREFIX = "sft_"  # noqa: S105 (a prefix, not a secret)


class Role(StrEnum):
    """What a token may do: each role may do what the ones before it may."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the token's name (the audit log's actor), role and tenant."""

    name: str
    role: Role
    tenant: str | None

    def may(self, role: Role) -> bool:
        return self.role.rank >= role.rank

    def sees(self, tenant: str | None) -> bool:
        """Whether the token may see (and, by role, act on) things of `tenant`."""
        return self.tenant is None or self.tenant == tenant


def new_secret() -> str:
    """A fresh token secret."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """What the store keeps of a secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def csrf_token(secret: str) -> str:
    """The console's form token for a session: derived from its token secret, so only a page
    served to that session knows it (a cross-site form cannot)."""
    return hmac.new(secret.encode("utf-8", "surrogateescape"), b"csrf", "sha256").hexdigest()


def csrf_matches(secret: str, sent: str) -> bool:
    return hmac.compare_digest(csrf_token(secret), sent)
