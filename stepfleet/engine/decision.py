"""A run's durable effects, and ending a wait at once with an event already stored."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from stepfleet.engine.journal_checks import over_limits
from stepfleet.engine.state import EngineLimits
from stepfleet.schemas import (
    EntryKind,
    ErrorKind,
    FailedAttempt,
    InstanceStatus,
    JournalEntry,
    RunMode,
    Waiting,
    WaitKind,
)

__all__ = ["Decision", "resolve_wait"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The effects of one run: the entries to record and the instance's new state."""

    status: InstanceStatus
    position: int
    entries: tuple[JournalEntry, ...] = ()
    attempt: int = 1
    waiting: Waiting | None = None
    mode: RunMode = RunMode.FORWARD
    end_status: InstanceStatus | None = None
    output: str | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    """Why this run errored the instance or began its compensations (None when it did
    neither, even while an earlier run's `error` is carried along)."""
    publish_step: bool = False
    """Publish a step message for `position` now (the instance goes on at once)."""
    failed_attempt: FailedAttempt | None = None
    state_bytes: int = 0

    @property
    def step_entry(self) -> JournalEntry | None:
        """The last entry recorded, which names the step in logs."""
        return self.entries[-1] if self.entries else None


def resolve_wait(
    decision: Decision, payload: str, received_at: datetime, limits: EngineLimits
) -> Decision:
    """End a wait the run has just begun with an event that was already waiting for it."""
    waiting = decision.waiting
    assert waiting is not None
    assert waiting.kind is WaitKind.EVENT
    entry = JournalEntry(
        seq=decision.position,
        kind=EntryKind.EVENT_RECEIVED,
        name=waiting.name,
        value=payload,
        started_at=received_at,
        finished_at=received_at,
    )
    over = over_limits(decision.position + 1, decision.state_bytes + len(payload.encode()), limits)
    if over:
        return replace(
            decision,
            status=InstanceStatus.ERRORED,
            waiting=None,
            error=over,
            error_kind=ErrorKind.LIMIT,
        )
    return replace(
        decision,
        status=InstanceStatus.RUNNING,
        position=decision.position + 1,
        entries=(*decision.entries, entry),
        waiting=None,
        publish_step=True,
        state_bytes=decision.state_bytes + len(payload.encode()),
    )
