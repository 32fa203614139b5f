"""Plain records the store reads and writes (no SQLAlchemy types leak out)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from stepfleet.schemas import InstanceKey, InstanceStatus, JournalEntry


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An instance a create message asks for."""

    key: InstanceKey
    module: str
    params: str


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """An instance row without its params and journal."""

    key: InstanceKey
    module: str
    status: InstanceStatus
    position: int
    generation: int
    output: str | None = None
    error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReplayData:
    """What a guest run needs beyond the row: params and the journal from some position on."""

    params: str
    entries: list[JournalEntry]


@dataclass(frozen=True, slots=True)
class StepWrite:
    """The effects of one step on one instance, written in the batch's transaction."""

    key: InstanceKey
    status: InstanceStatus
    position: int
    entry: JournalEntry | None
    output: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to publish once the transaction commits (headers as JSON text)."""

    routing_key: str
    headers: str
    body: bytes
