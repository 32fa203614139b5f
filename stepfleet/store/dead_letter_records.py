"""What the dead-letter archive takes in and gives back, and how operators select letters."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Archived", "DeadLetter", "LetterFilter", "NewDeadLetter"]


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


@dataclass(slots=True)
class Archived:
    """What one `archive` call stored."""

    new: int = 0
    """Letters that were not in the archive yet."""
    stripped: list[NewDeadLetter] = field(default_factory=list)
    """New letters kept without body and headers: their tenant's archive was over its bound."""


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
    }
