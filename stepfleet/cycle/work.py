"""What one cycle works on and what it returns: a message per instance, and its fate."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from stepfleet.broker import Outgoing
from stepfleet.cycle.replays import CachedReplay
from stepfleet.engine import Decision, InstanceState
from stepfleet.observe import Span
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
    """A create resumed as its first step (or a next step taken on by the worker that wrote
    it): the outbox row of that step's message, deleted by the write that finishes the step."""
    expected: InstanceState | None = None
    """A next step taken on by the worker that wrote it: the instance as that write left it,
    so its guest can run before the transaction (StepCycle._speculate)."""
    early: Early[H] | None = None
    """The run made before the transaction, kept for it if the instance has not moved."""
    apart: Apart[H] | None = None
    """A long run set apart by an earlier cycle (in a guest process, off its batch): taken by
    the next cycle if the instance has not moved. Kept by `renew`; a work is set apart once."""
    span: Span | None = None
    """This pass's delivery span, when tracing (cycle/tracing.py); closed with its batch."""
    key: InstanceKey = field(init=False)

    def __post_init__(self) -> None:
        self.key = InstanceKey(self.envelope.tenant, self.envelope.instance_id)

    def renew(self) -> None:
        """Forget what a previous cycle learned (the instance may have moved since), keeping
        what a resumed attempt carries."""
        self.record = self.state = self.replay = self.new_event = self.early = None
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
        """The instance's generation: its row's, else the state the run saw (0 for a create)."""
        if self.record is not None:
            return self.record.generation
        return self.state.generation if self.state is not None else 0


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
class Apart(Generic[H]):
    """A message whose guest run needs more than the inline slice, made in a guest process
    while nothing of it is written (its batch goes on without it). Once `report` is done, the
    work goes to a later cycle, which takes the run's outcome if the instance is still the one
    the run saw (`holds`), or runs the guest again."""

    work: Work[H]
    report: Future[GuestReport]
    state: InstanceState
    length: int
    """Journal entries the run saw."""
    started_at: datetime

    def holds(self, work: Work[H]) -> bool:
        """Whether the locked instance is the one the run saw and the run has its outcome."""
        return (
            work.state is not None
            and work.state == self.state
            and work.replay is not None
            and len(work.replay.journal) == self.length
            and self.report.done()
            and not self.report.cancelled()
            and self.report.exception() is None
        )

    def ran(self, finished_at: datetime) -> Ran[H]:
        """The run, for the cycle that takes it (`holds` first)."""
        return Ran(self.work, self.report.result(), self.started_at, finished_at)


@dataclass(frozen=True, slots=True)
class Rejected(Generic[H]):
    """A message that can never be processed: the caller dead-letters it."""

    work: Work[H]
    reason: DeadReason
    detail: str


@dataclass(frozen=True, slots=True)
class Early(Generic[H]):
    """A run made before its transaction, over `replay` as it was then (`length` entries)."""

    ran: Ran[H]
    replay: CachedReplay
    length: int
    created: InstanceState | None = None
    """A create's first run (cycle/created.py): the instance it saw, the one its create
    makes."""

    def still_holds(self, work: Work[H]) -> bool:
        """Whether the locked instance is the one the run saw, so its outcome stands."""
        if self.created is not None:  # admission made the same new instance
            return (
                work.created
                and work.state == self.created
                and work.replay is not None
                and work.replay.params == self.replay.params
                and not len(work.replay.journal)
                and not work.pending
            )
        return (
            work.state is not None
            and work.state == work.expected
            and work.replay is self.replay
            and len(self.replay.journal) == self.length
        )


@dataclass(frozen=True, slots=True)
class NextStep:
    """A step message a committed write asks for: its outbox row, the message to publish,
    and the same message as a parsed envelope (for a worker that takes it on itself)."""

    outbox_id: int
    message: Outgoing
    envelope: Envelope
    state: InstanceState
    """The instance as the write left it."""
    call: CallRequested | None = None
    """The HTTP call the step's run, made before the write (cycle/chain.py), stopped at: a
    worker that takes the step on makes it at once instead of running the guest again."""
    started_at: datetime | None = None
    """When that run began (the attempt's start)."""


@dataclass(slots=True)
class CycleResult(Generic[H]):
    """What one cycle did, once its transaction committed."""

    ran: list[Ran[H]] = field(default_factory=list)
    rejected: list[Rejected[H]] = field(default_factory=list)
    duplicates: list[Work[H]] = field(default_factory=list)
    suspended: list[Suspended[H]] = field(default_factory=list)
    apart: list[Apart[H]] = field(default_factory=list)
    """Runs going on in a guest process, off the batch: nothing of them was written."""
    held: int = 0
    """Instances parked by their tenant's quotas instead of run."""
    early: list[Work[H]] = field(default_factory=list)
    """Events held for instances that do not exist yet (acknowledged: the store has them)."""
    again: list[Work[H]] = field(default_factory=list)
    """Events whose instance was created while this cycle ran: the caller hands them to a
    later cycle (unacknowledged), which delivers them as usual."""
    held_keys: set[InstanceKey] = field(default_factory=set)
    """Those instances."""
    transaction: tuple[float, float] | None = None
    """When its transaction began and ended (monotonic seconds), if it had one."""
    next_steps: list[NextStep] = field(default_factory=list)
    """Step messages to send now that the transaction committed (each also in the outbox,
    until the broker confirmed it or the step it asks for is written)."""
    guest_seconds: float = 0.0
    """How long its guest runs took (the hand-over to the guest thread included)."""

    @property
    def messages(self) -> list[Outgoing]:
        """The next steps' messages, to publish."""
        return [step.message for step in self.next_steps]

    @property
    def outbox_ids(self) -> list[int]:
        """The next steps' outbox rows: delete them once the broker confirmed the publish."""
        return [step.outbox_id for step in self.next_steps]


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


def state_after(work: Work[H], decision: Decision) -> InstanceState:
    """The instance as the write of `decision` leaves it (what state_of its row gives)."""
    return InstanceState(
        key=work.key,
        module=work.module,
        status=decision.status,
        position=decision.position,
        generation=work.generation,
        attempt=decision.attempt,
        waiting=decision.waiting,
        mode=decision.mode,
        end_status=decision.end_status,
        error=decision.error,
        state_bytes=decision.state_bytes,
    )


def write_of(key: InstanceKey, decision: Decision, traceparent: str | None = None) -> StepWrite:
    """The store write that records a decision (and the trace context that made it)."""
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
        traceparent=traceparent,
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
