"""What the archive records of a dead letter, and what the archiver must know of the fleet
to judge it.

Headers are whatever the publisher sent, so the archive records who sent a letter only from
what RabbitMQ vouches for: the `user_id` property it checks against the publishing
connection, and, on a message the fleet published, RabbitMQ's own `x-death` history (a
producer can send an `x-death` header too, and RabbitMQ builds on it). A replay trusts those
records, never a header.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from stepfleet.broker import Delivery, Topology
from stepfleet.cycle.messages import (
    DEAD_LETTER_ID,
    MOVED_EXCHANGE,
    MOVED_KEY,
    MOVED_USER,
    REPLAYED_FOR,
)
from stepfleet.schemas import Headers
from stepfleet.store import NewDeadLetter
from stepfleet.workers.logs import first_line
from stepfleet.workers.settings import Settings

__all__ = ["TRUNCATED_BODY_BYTES", "ArchivePolicy", "letter_of", "minimal_letter"]

# How deep AMQP tables and arrays in headers are kept: a deeper value is noted, not stored.
_MAX_DEPTH = 32

TRUNCATED_BODY_BYTES = 4096
"""What the archive keeps of a body larger than the fleet's message size limit."""


@dataclass(frozen=True, slots=True)
class ArchivePolicy:
    """What the archiver must know of the fleet to judge and bound its letters."""

    topology: Topology
    fleet_user: str
    """The fleet's broker user: what it published (a worker's dead letter) is the fleet's."""
    trusted_users: frozenset[str]
    """The fleet's user and the platform users, trusted to publish for any tenant."""
    max_body_bytes: int
    """A body up to this size (the fleet's message size limit) is kept whole."""
    account_bytes: int | None
    """What one tenant's letters may keep of bodies and headers; None: no bound."""

    @classmethod
    def of(cls, settings: Settings) -> ArchivePolicy:
        return cls(
            topology=settings.topology(),
            fleet_user=settings.broker_user,
            trusted_users=settings.trusted_users,
            max_body_bytes=settings.max_message_bytes,
            account_bytes=settings.dead_letter_tenant_bytes,
        )


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a letter came from, as far as the broker vouches for it."""

    source: str
    reason: str
    detail: str
    routing_key: str
    sender: str | None = None
    first_exchange: str | None = None
    key: str | None = None


def letter_of(delivery: Delivery, policy: ArchivePolicy) -> NewDeadLetter:
    """What the archive keeps of a dead letter: its headers as JSON values, its body (a prefix
    of it past the size limit), and who sent it as far as RabbitMQ vouches for that."""
    headers = {str(k): _plain(v) for k, v in delivery.headers.items()}
    origin = _origin(delivery, headers, policy)
    body = delivery.body
    unreplayable = None
    if len(body) > policy.max_body_bytes:
        body = body[:TRUNCATED_BODY_BYTES]
        unreplayable = (
            f"its body of {len(delivery.body)} bytes is over the fleet's limit of "
            f"{policy.max_body_bytes}: the archive kept its first {len(body)} bytes"
        )
    tenant = _text(headers.get(Headers.TENANT))
    account, account_user = None, None
    trusted = origin.sender in policy.trusted_users
    if trusted or origin.first_exchange == policy.topology.internal_exchange:
        account = tenant  # the fleet's or a platform user's word for the tenant
    elif origin.sender:
        account_user = origin.sender  # a producer's letters count against its own tenant
    return NewDeadLetter(
        letter_key=origin.key or _content_key(delivery, headers),
        reason=origin.reason,
        detail=origin.detail,
        routing_key=origin.routing_key,
        headers=headers,
        body=body,
        message_id=delivery.message_id,
        tenant=tenant,
        instance_id=_text(headers.get(Headers.INSTANCE)),
        kind=_text(headers.get(Headers.KIND)),
        module=_text(headers.get(Headers.MODULE)),
        source=origin.source,
        sender=origin.sender,
        first_exchange=origin.first_exchange,
        account=account,
        account_user=account_user,
        body_size=len(delivery.body),
        body_sha256=hashlib.sha256(delivery.body).hexdigest(),
        unreplayable=unreplayable,
    )


def _origin(delivery: Delivery, headers: Mapping[str, Any], policy: ArchivePolicy) -> _Origin:
    topology = policy.topology
    from_fleet = delivery.user_id == policy.fleet_user
    deaths = [d for d in _list(headers.get("x-death")) if isinstance(d, dict)]
    first_death = _text(headers.get("x-first-death-exchange"))
    if first_death is None and deaths:
        first_death = _text(deaths[-1].get("exchange"))
    if from_fleet and (not deaths or first_death == topology.dead_letter_exchange):
        # A worker's dead letter (perhaps dead-lettered once more by RabbitMQ since): the
        # worker wrote every x-original-* and x-dead-* header, after dropping the producer's.
        original_user = _text(headers.get("x-original-user-id"))
        replayed_for = _text(headers.get("x-original-replayed-for"))
        return _Origin(
            "worker",
            reason=_text(headers.get(Headers.DEAD_REASON)) or "unknown",
            detail=_text(headers.get(Headers.DEAD_DETAIL)) or "",
            routing_key=_text(headers.get("x-original-routing-key")) or delivery.routing_key,
            sender=replayed_for
            if replayed_for and original_user == policy.fleet_user
            else original_user,
            first_exchange=_text(headers.get("x-original-exchange")),
            key=_text(headers.get(DEAD_LETTER_ID)),
        )
    if deaths:
        # RabbitMQ dead-lettered the message itself (delivery limit, expiry). Its newest
        # x-death entry is the dead-lettering that just happened; the rest of the history is
        # RabbitMQ's only on a message the fleet published.
        death = deaths[0]
        why = (_text(death.get("reason")) or "unknown").replace("_", "-")
        detail = f"RabbitMQ dead-lettered it from {_text(death.get('queue'))} ({why})"
        if why == "delivery-limit":
            detail += "; no worker could finish it"
        if not from_fleet:
            # Its user_id is the publisher, whatever its headers claim; its first exchange is
            # not vouched for, so it can only ever be replayed as that publisher's message.
            return _Origin("rabbitmq", why, detail, delivery.routing_key, delivery.user_id or None)
        replayed_for = _text(headers.get(REPLAYED_FOR))
        routing_key, sender = delivery.routing_key, policy.fleet_user
        if first_death == topology.side_exchange and MOVED_KEY in headers:
            # Moved to a side lane by a worker, which recorded where it came from.
            routing_key = _text(headers.get(MOVED_KEY)) or routing_key
            first_death = _text(headers.get(MOVED_EXCHANGE))
            sender = _text(headers.get(MOVED_USER)) or policy.fleet_user
        if first_death == topology.ingress_exchange and replayed_for:
            sender = replayed_for if sender == policy.fleet_user else sender
        return _Origin("rabbitmq", why, detail, routing_key, sender, first_death)
    # Published straight to the dead-letter exchange by someone who is not the fleet (or by a
    # worker older than this archiver): nothing in it is vouched for.
    who = f"broker user {delivery.user_id!r}" if delivery.user_id else "a publisher without user_id"
    claimed = _text(headers.get(Headers.DEAD_DETAIL))
    return _Origin(
        "other",
        reason=_text(headers.get(Headers.DEAD_REASON)) or "unknown",
        detail=f"published to the dead-letter exchange by {who}, not the fleet"
        + (f"; it says: {claimed}" if claimed else ""),
        routing_key=delivery.routing_key,
    )


def minimal_letter(
    delivery: Delivery,
    policy: ArchivePolicy,
    error: BaseException,
    letter: NewDeadLetter | None = None,
) -> NewDeadLetter:
    """A record of a letter the database would not take as it was: ASCII text only, the raw
    headers as their ASCII repr, the body as bytes (a prefix past the size limit)."""
    body = delivery.body
    if len(body) > policy.max_body_bytes:
        body = body[:TRUNCATED_BODY_BYTES]
    try:
        raw_headers = ascii(dict(delivery.headers))
    except RecursionError:
        raw_headers = "<headers nested too deeply to show>"
    key = letter.letter_key if letter else _raw_key(delivery, raw_headers)
    return NewDeadLetter(
        letter_key=_ascii(key, 200),
        reason=_ascii(letter.reason if letter else "unknown", 100),
        detail=f"kept as a minimal record: the database refused it ({_ascii(first_line(error), 300)})",
        routing_key=_ascii(delivery.routing_key, 300),
        headers={"x-stepfleet-raw-headers": raw_headers},
        body=body,
        message_id=None if delivery.message_id is None else _ascii(delivery.message_id, 300),
        tenant=None if letter is None or letter.tenant is None else _ascii(letter.tenant, 100),
        instance_id=None
        if letter is None or letter.instance_id is None
        else _ascii(letter.instance_id, 200),
        source=letter.source if letter else "other",
        account=None if letter is None or letter.account is None else _ascii(letter.account, 100),
        account_user=None
        if letter is None or letter.account_user is None
        else _ascii(letter.account_user, 300),
        body_size=len(delivery.body),
        body_sha256=hashlib.sha256(delivery.body).hexdigest(),
        unreplayable="the archive could not store it whole, only as a minimal record",
    )


def _content_key(delivery: Delivery, headers: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for part in (delivery.routing_key, delivery.user_id or "", delivery.message_id or ""):
        digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
    try:
        digest.update(json.dumps(headers, sort_keys=True, default=str).encode())
    except (TypeError, ValueError, RecursionError):
        digest.update(ascii(headers).encode())
    digest.update(delivery.body)
    return "sha256:" + digest.hexdigest()


def _raw_key(delivery: Delivery, raw_headers: str) -> str:
    digest = hashlib.sha256()
    digest.update(_ascii(delivery.routing_key, 300).encode() + b"\0")
    digest.update(raw_headers.encode() + b"\0")
    digest.update(delivery.body)
    return "sha256:" + digest.hexdigest()


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: object) -> str | None:
    """A header value as column text (None for tables and arrays: they stay in the headers)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return _decoded(value)
    if isinstance(value, str | int | float | bool):
        return str(value)
    return None


def _decoded(value: bytes) -> str:
    """UTF-8 as text; bytes that are not UTF-8 as `\\xNN`."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("utf-8", "backslashreplace")


def _plain(value: object, depth: int = 0) -> object:
    """An AMQP field value as a JSON value: bytes as text (`\\xNN` where not UTF-8), decimals
    and non-finite floats as text, timestamps in ISO 8601, tables and arrays as objects and
    lists down to a bounded depth."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _decoded(bytes(value))
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, list | tuple | Mapping) and depth >= _MAX_DEPTH:
        return f"<nested deeper than {_MAX_DEPTH} levels: not kept>"
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return repr(value)


def _ascii(value: str, limit: int) -> str:
    return value.encode("unicode_escape").decode("ascii")[:limit]
