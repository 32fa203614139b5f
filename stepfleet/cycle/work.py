"""What one cycle works on and what it returns: a message per instance, and its fate."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from stepfleet.broker import Outgoing
from stepfleet.cycle.replays import CachedReplay
from stepfleet.engine import Decision, InstanceState
from stepfleet.schemas import (
    AnsweredCall,
    CallRequested,
    DeadReason,
    Envelope,
    GuestReport,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
)
from stepfleet.store import InstanceRecord, NewEvent, StepWrite

H = TypeVar("H")
"""The caller's handle on a message (a broker delivery in the fleet)."""


@dataclass(slots=True)
class Work(Generic[H]):
    """A valid message for one instance, and what the cycle learns about it."""

    handle: H
    envelope: Envelope
    record: InstanceRecord | None = None
    state: InstanceState | None = None
    """The instance as the run sees it (after a wake or an event ended its wait)."""
    pending: tuple[JournalEntry, ...] = ()
    """Entries this message brings before the run: an event's payload, a wait's timeout."""
    replay: CachedReplay | None = None
    created: bool = False
    """A create whose instance does not exist yet: the cycle inserts its row with its write."""
    new_event: NewEvent | None = None
    """An event that ends the instance's wait: stored with the run's write."""
    answers: tuple[AnsweredCall, ...] = ()
    """A resumed attempt: the answers of its step's HTTP calls so far."""
    step_deadline: float | None = None
    """A resumed attempt: when its step's timeout runs out (monotonic seconds)."""
    started_at: datetime | None = None
    """A resumed attempt: when its first run began (the step's recorded start)."""
    intent: int | None = None
    """A create resumed as its first step: the outbox row of that step's message, written
    when the create's row was, deleted by the write that finishes the step."""
    key: InstanceKey = field(init=False)

    def __post_init__(self) -> None:
        self.key = InstanceKey(self.envelope.tenant, self.envelope.instance_id)

    def renew(self) -> None:
        """Forget what a previous cycle learned (the instance may have moved since), keeping
        what a resumed attempt carries."""
        self.record = self.state = self.replay = self.new_event = None
        self.pending = ()
        self.created = False

    @property
    def module(self) -> str:
        """The instance's module: its row's, or the create's before the row exists."""
        if self.record is not None:
            return self.record.module
        assert self.envelope.module is not None
        return self.envelope.module

    @property
    def generation(self) -> int:
        return self.record.generation if self.record is not None else 0


@dataclass(slots=True)
class Ran(Generic[H]):
    """One guest run of the cycle and what the engine decided it means."""

    work: Work[H]
    report: GuestReport
    started_at: datetime
    finished_at: datetime
    decision: Decision | None = None


@dataclass(frozen=True, slots=True)
class Suspended(Generic[H]):
    """A message whose step stopped at an HTTP call: nothing of it was written. Make the call
    (`CallScheduler`), then hand the work to a later cycle, which runs the attempt again with
    every answer so far."""

    work: Work[H]
    call: CallRequested


@dataclass(frozen=True, slots=True)
class Rejected(Generic[H]):
    """A message that can never be processed: the caller dead-letters it."""

    work: Work[H]
    reason: DeadReason
    detail: str


@dataclass(slots=True)
class CycleResult(Generic[H]):
    """What one cycle did, once its transaction committed."""

    ran: list[Ran[H]] = field(default_factory=list)
    rejected: list[Rejected[H]] = field(default_factory=list)
    duplicates: list[Work[H]] = field(default_factory=list)
    suspended: list[Suspended[H]] = field(default_factory=list)
    held: int = 0
    """Instances parked by their tenant's quotas instead of run."""
    messages: list[Outgoing] = field(default_factory=list)
    """Step messages to publish now that the transaction committed (also in the outbox)."""
    outbox_ids: list[int] = field(default_factory=list)
    """The outbox rows of `messages`: delete them once the broker confirmed the publish."""


def state_of(record: InstanceRecord) -> InstanceState:
    """The engine's view of a stored instance."""
    return InstanceState(
        key=record.key,
        module=record.module,
        status=record.status,
        position=record.position,
        generation=record.generation,
        attempt=record.attempt,
        waiting=record.waiting,
        mode=record.mode,
        end_status=record.end_status,
        error=record.error,
        state_bytes=record.state_bytes,
    )


def write_of(key: InstanceKey, decision: Decision) -> StepWrite:
    """The store write that records a decision."""
    return StepWrite(
        key=key,
        status=decision.status,
        position=decision.position,
        entries=decision.entries,
        attempt=decision.attempt,
        waiting=decision.waiting,
        mode=decision.mode,
        end_status=decision.end_status,
        output=decision.output,
        error=decision.error,
        state_bytes=decision.state_bytes,
        failed_attempt=decision.failed_attempt,
    )


def errored(record: InstanceRecord, message: str) -> StepWrite:
    """The write that ends an instance as errored with `message`, keeping its journal."""
    return StepWrite(
        key=record.key,
        status=InstanceStatus.ERRORED,
        position=record.position,
        attempt=record.attempt,
        mode=record.mode,
        end_status=record.end_status,
        error=message,
        state_bytes=record.state_bytes,
    )
