"""Dead letters as records, and how their rows are made storable, filtered and read."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select

from stepfleet.store.records import InstanceRecord
from stepfleet.store.tables import dead_letters, instances


@dataclass(frozen=True, slots=True)
class NewDeadLetter:
    """A dead letter taken from the queue, to archive.

    Text may hold anything a producer sent (NUL, unpaired surrogates, any length): the store
    escapes and clips it (`storable`). Headers must be JSON values.
    """

    letter_key: str
    reason: str
    detail: str
    routing_key: str
    headers: dict[str, Any]
    body: bytes
    message_id: str | None = None
    tenant: str | None = None
    instance_id: str | None = None
    kind: str | None = None
    module: str | None = None
    source: str = "other"
    """How it reached the archive: `worker`, `rabbitmq` or `other`."""
    sender: str | None = None
    """The broker user that published the original, as RabbitMQ vouches; None: unknown."""
    first_exchange: str | None = None
    """The exchange the original was first published to, as RabbitMQ vouches; None: unknown."""
    account: str | None = None
    """The tenant the letter counts against, when the archiver can tell it."""
    account_user: str | None = None
    """Else the broker user whose tenant (as the tenants table says) it counts against."""
    body_size: int | None = None
    """The size of the whole body when `body` is only a prefix of it."""
    body_sha256: str | None = None
    """The SHA-256 (hex) of the whole body when `body` is only a prefix of it."""
    unreplayable: str | None = None
    """Why the letter must never be replayed, if the archiver knows already."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An archived dead letter with the workflow context it was archived with."""

    id: int
    received_at: datetime
    reason: str
    detail: str
    tenant: str | None
    instance_id: str | None
    kind: str | None
    module: str | None
    routing_key: str
    message_id: str | None
    headers: dict[str, Any]
    body: bytes
    context: dict[str, Any]
    replayed_at: datetime | None = None
    replayed_by: str | None = None
    source: str = "legacy"
    sender: str | None = None
    first_exchange: str | None = None
    account: str = ""
    body_size: int = 0
    body_sha256: str = ""
    unreplayable: str | None = None

    @property
    def body_truncated(self) -> bool:
        """Whether `body` is less than the body the letter had (a prefix, or nothing)."""
        return len(self.body) < self.body_size


@dataclass(frozen=True, slots=True)
class Stalled:
    """An instance the archive marked stalled: the letter, its archive id, and the instance as
    it stood (at the position the letter was for)."""

    letter: NewDeadLetter
    letter_id: int
    instance: InstanceRecord


@dataclass(slots=True)
class Archived:
    """What one `archive` call stored."""

    new: int = 0
    """Letters that were not in the archive yet."""
    stripped: list[NewDeadLetter] = field(default_factory=list)
    """New letters kept without body and headers: their tenant's archive was over its bound."""
    stalled: list[Stalled] = field(default_factory=list)
    """Instances marked stalled by these letters."""


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which archived letters an operator means; unset fields match everything."""

    ids: tuple[int, ...] = ()
    tenant: str | None = None
    reason: str | None = None
    instance_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_replayed: bool = False
    stalled: bool = False
    """Only the letters that left their instance stalled (the instance is still marked)."""
    limit: int | None = None

    def describe(self) -> dict[str, Any]:
        """The filter as the audit log records it."""
        return {k: v for k, v in _fields(self).items() if v not in (None, [], False)}


def _fields(letter_filter: LetterFilter) -> dict[str, Any]:
    return {
        "ids": list(letter_filter.ids),
        "tenant": letter_filter.tenant,
        "reason": letter_filter.reason,
        "instance_id": letter_filter.instance_id,
        "since": letter_filter.since,
        "until": letter_filter.until,
        "include_replayed": letter_filter.include_replayed,
        "stalled": letter_filter.stalled,
    }


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


def storable(letter: NewDeadLetter) -> NewDeadLetter:
    """The letter with every text storable and short columns clipped."""
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
    """The headers a letter keeps when its account is over its bound."""
    return {
        name: storable_text(value, _SHORT)
        for name in _ROUTING_HEADERS
        if isinstance(value := headers.get(name), str)
    }


def account_name(account: str) -> str:
    """An account as messages name it."""
    return f"tenant {account!r}" if account else "letters of no known tenant"


def filtered(query: Select[Any], f: LetterFilter) -> Select[Any]:
    """The query narrowed to the letters the filter selects."""
    c = dead_letters.c
    if f.ids:
        query = query.where(c.id.in_(list(f.ids)))
    if f.tenant:
        query = query.where(c.tenant == f.tenant)
    if f.reason:
        query = query.where(c.reason == f.reason)
    if f.instance_id:
        query = query.where(c.instance_id == f.instance_id)
    if f.since:
        query = query.where(c.received_at >= f.since)
    if f.until:
        query = query.where(c.received_at < f.until)
    if not f.include_replayed:
        query = query.where(c.replayed_at.is_(None))
    if f.stalled:
        query = query.where(
            c.id.in_(
                select(instances.c.stalled_letter).where(instances.c.stalled_letter.is_not(None))
            )
        )
    return query


def letter_from_row(row: Any) -> DeadLetter:
    """A dead letter from a row of the archive."""
    return DeadLetter(
        id=row.id,
        received_at=row.received_at,
        reason=row.reason,
        detail=row.detail,
        tenant=row.tenant,
        instance_id=row.instance_id,
        kind=row.kind,
        module=row.module,
        routing_key=row.routing_key,
        message_id=row.message_id,
        headers=json.loads(row.headers),
        body=bytes(row.body),
        context=json.loads(row.context),
        replayed_at=row.replayed_at,
        replayed_by=row.replayed_by,
        source=row.source,
        sender=row.sender,
        first_exchange=row.first_exchange,
        account=row.account,
        body_size=row.body_size,
        body_sha256=row.body_sha256,
        unreplayable=row.unreplayable,
    )
