"""Plain records the store reads and writes (no SQLAlchemy types leak out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime

from stepfleet.schemas import (
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    RunMode,
    Waiting,
)


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An instance a create message asks for."""

    key: InstanceKey
    module: str
    params: str
    retention_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Stall:
    """Why a live instance has nothing to move it: the dead letter that held its next step."""

    letter_id: int
    """The archived letter (`stepfleet dlq show ID`); replaying it moves the instance on."""
    reason: str
    """The letter's reason (`delivery-limit`, `unprocessable`, ...)."""
    at: datetime | None = None
    """When the archiver marked the instance."""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """An instance row without its params and journal."""

    key: InstanceKey
    module: str
    status: InstanceStatus
    position: int
    generation: int
    attempt: int = 1
    waiting: Waiting | None = None
    mode: RunMode = RunMode.FORWARD
    end_status: InstanceStatus | None = None
    state_bytes: int = 0
    output: str | None = None
    error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    retain_until: datetime | None = None
    stalled: Stall | None = None
    """Set when a dead letter left the instance with nothing to move it."""
    traceparent: str | None = None
    """The trace context of the delivery that last wrote the state (continued by wakes)."""


@dataclass(frozen=True, slots=True)
class StepWrite:
    """The effects of one delivery on one instance, written in the batch's transaction."""

    key: InstanceKey
    status: InstanceStatus
    position: int
    entries: tuple[JournalEntry, ...] = ()
    attempt: int = 1
    waiting: Waiting | None = None
    mode: RunMode = RunMode.FORWARD
    end_status: InstanceStatus | None = None
    output: str | None = None
    error: str | None = None
    state_bytes: int = 0
    failed_attempt: FailedAttempt | None = None
    traceparent: str | None = None
    """The writing delivery's trace context; None keeps the row's."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to publish once the transaction commits (headers as JSON text)."""

    routing_key: str
    headers: str
    body: bytes
    exchange: str | None = None
    """Where to publish it; None is the internal exchange (step and wake messages)."""


@dataclass(frozen=True, slots=True)
class ExpectedRow:
    """An instance row as the writer last left it: the columns a step's outcome depends on
    (the engine's view of the instance)."""

    key: InstanceKey
    module: str
    status: InstanceStatus
    position: int
    generation: int
    attempt: int = 1
    mode: RunMode = RunMode.FORWARD
    end_status: InstanceStatus | None = None
    error: str | None = None
    state_bytes: int = 0

    def matches(self, record: InstanceRecord) -> bool:
        """Whether `record` is still this row (a parked row never is: it waits)."""
        return (
            record.waiting is None
            and (record.key, record.module, record.status, record.position)
            == (self.key, self.module, self.status, self.position)
            and (record.generation, record.attempt, record.mode, record.end_status)
            == (self.generation, self.attempt, self.mode, self.end_status)
            and (record.error, record.state_bytes) == (self.error, self.state_bytes)
        )


@dataclass(frozen=True, slots=True)
class GuardedWrite:
    """A step's write made on the row as `expected` says, written only if the row is still
    that: with the next step's outbox row, and the outbox row of the message it finishes
    (kept for the relay until then)."""

    write: StepWrite
    expected: ExpectedRow
    next_step: OutboxMessage | None = None
    finishes: int | None = None


@dataclass(frozen=True, slots=True)
class GuardedCreate:
    """A create's first step, run before its row exists: the row is inserted with the step's
    write and next step's outbox row, unless a row of that key exists already."""

    new: NewInstance
    write: StepWrite
    next_step: OutboxMessage | None = None


@dataclass(frozen=True, slots=True)
class CreatesWritten:
    """What `write_created` did. A create in neither `inserted` nor `existing` wrote nothing
    (its row came meanwhile, unseen): the step transaction decides it, as it does every
    create when `busy`."""

    inserted: dict[InstanceKey, int | None] = field(default_factory=dict)
    """The rows inserted, each with its next step's outbox id (None without one)."""
    existing: dict[InstanceKey, str] = field(default_factory=dict)
    """The keys whose row existed already, with the module it runs."""
    adopted: int = 0
    """Events held for the inserted instances, now stored for their waits."""
    busy: bool = False
    """Nothing was written: a hold of early events or another create of one of these keys
    was under way, or committed while the statement began."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event for an instance; `consumed_seq` is set when it ends the instance's wait now."""

    key: InstanceKey
    event_id: str
    type: str
    payload: str
    consumed_seq: int | None = None


@dataclass(frozen=True, slots=True)
class EarlyEvent:
    """An event for an instance that does not exist yet: held until its create takes it.

    `letter` is the dead letter (`unknown-instance`) queued in the outbox if the instance
    does not come before the hold ends."""

    event: NewEvent
    letter: OutboxMessage


@dataclass(frozen=True, slots=True)
class EarlyHolding:
    """What `hold_early_events` did with the events it was given (the others are held)."""

    existing: set[InstanceKey] = field(default_factory=set)
    """Instances that exist after all (created and committed meanwhile): their events are
    not held, but handled again as ordinary events."""
    refused: list[EarlyEvent] = field(default_factory=list)
    """Events not held because their tenant's held events would take more than its share."""


def held_bytes(early: EarlyEvent) -> int:
    """What a held event stores, counted against its tenant's share: its payload, and its
    dead letter's headers and body."""
    return (
        len(early.event.payload.encode())
        + len(early.letter.headers.encode())
        + len(early.letter.body)
    )


def within_share(
    candidates: Sequence[EarlyEvent],
    used: Mapping[str, int],
    already: Set[tuple[InstanceKey, str]],
    share: int | None,
) -> tuple[list[EarlyEvent], list[EarlyEvent]]:
    """Split events to hold, in order, into those that fit their tenant's share of held
    bytes (`used`: what each tenant holds now; None: no share) and those that do not. A
    repeat of an event held already (in `already`, or earlier among `candidates`) adds
    nothing and is never refused."""
    if share is None:
        return list(candidates), []
    taken = dict(used)
    seen = set(already)
    fits: list[EarlyEvent] = []
    refused: list[EarlyEvent] = []
    for early in candidates:
        ident = (early.event.key, early.event.event_id)
        tenant = early.event.key.tenant
        size = held_bytes(early)
        if ident in seen:
            fits.append(early)
        elif taken.get(tenant, 0) + size <= share:
            taken[tenant] = taken.get(tenant, 0) + size
            seen.add(ident)
            fits.append(early)
        else:
            refused.append(early)
    return fits, refused


@dataclass(frozen=True, slots=True)
class HeldEvent:
    """An early event as `stepfleet status` shows it: held until its instance's create."""

    event_id: str
    type: str
    received_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A parked instance whose timer is due: what its wake message must name."""

    key: InstanceKey
    module: str
    position: int
    attempt: int
    generation: int
    wake_at: datetime
    traceparent: str | None = None
    """The instance's trace context, for the wake to continue its trace."""


@dataclass(frozen=True, slots=True)
class Unmoved:
    """A live instance the stall sweep found with nothing to move it: the step message it
    needs names this position and generation."""

    key: InstanceKey
    module: str
    position: int
    generation: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class InstanceDetail:
    """An instance with everything status views show."""

    record: InstanceRecord
    params: str
    journal: list[JournalEntry] = field(default_factory=list)
    attempts: list[FailedAttempt] = field(default_factory=list)
    pending_events: int = 0


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An operator action: who did what to which target, with the filter of a bulk action."""

    actor: str
    action: str
    target: str
    filter: dict[str, object] = field(default_factory=dict)
    count: int = 1
    detail: str = ""
    at: datetime | None = None
