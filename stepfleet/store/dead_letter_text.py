"""Dead letters made storable: text PostgreSQL can hold, clipped to what its indexes take,
and headers as JSON whatever a producer sent."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from stepfleet.store.dead_letter_records import NewDeadLetter

__all__ = ["headers_json", "routing_headers", "storable_letter", "storable_text"]

# Short text columns are clipped (in characters, after escaping) well under what a btree
# index entry may hold; the full values stay in the headers.
_SHORT = 512
_DETAIL = 4000
# The headers a letter keeps when its tenant's archive is over its bound.
_ROUTING_HEADERS = ("x-tenant", "x-instance-id", "x-kind", "x-module", "x-dead-reason")


def storable_text(value: str, limit: int | None = None) -> str:
    """Text PostgreSQL can store: NUL as `\\x00`, unpaired surrogates as `\\udXXX`, clipped to
    `limit` characters."""
    if limit is not None:
        value = value[: limit * 2]
    escaped = value.replace("\x00", "\\x00")
    escaped = escaped.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped if limit is None else escaped[:limit]


def _short(value: str | None) -> str | None:
    return None if value is None else storable_text(value, _SHORT)


def storable_letter(letter: NewDeadLetter) -> NewDeadLetter:
    """The letter with every text storable and the whole body's size and hash filled in."""
    return NewDeadLetter(
        letter_key=storable_text(letter.letter_key, _SHORT),
        reason=storable_text(letter.reason, _SHORT),
        detail=storable_text(letter.detail, _DETAIL),
        routing_key=storable_text(letter.routing_key, _SHORT),
        headers=letter.headers,
        body=letter.body,
        message_id=_short(letter.message_id),
        tenant=_short(letter.tenant),
        instance_id=_short(letter.instance_id),
        kind=_short(letter.kind),
        module=_short(letter.module),
        source=storable_text(letter.source, _SHORT),
        sender=_short(letter.sender),
        first_exchange=_short(letter.first_exchange),
        account=_short(letter.account),
        account_user=_short(letter.account_user),
        body_size=len(letter.body) if letter.body_size is None else letter.body_size,
        body_sha256=letter.body_sha256 or hashlib.sha256(letter.body).hexdigest(),
        unreplayable=None if letter.unreplayable is None else storable_text(letter.unreplayable),
    )


def headers_json(headers: Mapping[str, Any]) -> str:
    """The headers as JSON text: ASCII only, so any string survives (NUL as \\u0000)."""
    try:
        return json.dumps(headers, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        # Not JSON values (a caller's bug): keep them as their ASCII repr rather than fail.
        return json.dumps({"x-stepfleet-headers": ascii(headers)})


def routing_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: storable_text(value, _SHORT)
        for name in _ROUTING_HEADERS
        if isinstance(value := headers.get(name), str)
    }
