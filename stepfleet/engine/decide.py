"""What a guest outcome means for the instance: the engine's state machine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from stepfleet.engine.state import InstanceState
from stepfleet.schemas import (
    Completed,
    EntryKind,
    GuestCrashed,
    GuestOutcome,
    InstanceStatus,
    JournalEntry,
    Nondeterministic,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
)

__all__ = ["Decision", "InstanceState", "decide"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The effects of one run: at most one journal entry, the new state, the next message."""

    status: InstanceStatus
    position: int
    entry: JournalEntry | None = None
    output: str | None = None
    error: str | None = None
    next_position: int | None = None
    """Publish a step message for this journal position (None: nothing to publish)."""


def decide(
    state: InstanceState,
    journal: Sequence[JournalEntry],
    outcome: GuestOutcome,
    *,
    started_at: datetime,
    finished_at: datetime,
) -> Decision:
    """Turn a guest's outcome for the instance's next step into durable effects.

    Never raises: a guest that breaks the ABI errors its instance instead.
    """
    length = len(journal)

    def errored(message: str) -> Decision:
        return Decision(status=InstanceStatus.ERRORED, position=length, error=message)

    def record(kind: EntryKind, name: str, value: str) -> Decision:
        entry = JournalEntry(
            seq=length,
            kind=kind,
            name=name,
            value=value,
            attempt=1,
            started_at=started_at,
            finished_at=finished_at,
        )
        return Decision(
            status=InstanceStatus.RUNNING,
            position=length + 1,
            entry=entry,
            next_position=length + 1,
        )

    match outcome:
        case StepSucceeded(seq=seq, name=name, result=result):
            if seq != length:
                return errored(_misplaced("a step", seq, length))
            return record(EntryKind.STEP_SUCCEEDED, name, result)
        case StepFailed(seq=seq, name=name, message=message):
            if seq != length:
                return errored(_misplaced("a failed step", seq, length))
            # The failure is recorded and handed back to the program on the next run,
            # which may handle it or give up.
            return record(EntryKind.STEP_FAILED, name, message)
        case Completed(seq=seq, output=output):
            if seq < length:
                return errored(
                    f"nondeterminism: the workflow finished after {seq} steps "
                    f"but the journal holds {length}"
                )
            if seq > length:
                return errored(_misplaced("completion", seq, length))
            return Decision(status=InstanceStatus.COMPLETE, position=length, output=output)
        case WorkflowFailed(message=message):
            return errored(f"workflow failed: {message}")
        case Nondeterministic(seq=seq, name=name):
            if not 0 <= seq < length:
                return errored(_misplaced("nondeterminism", seq, length))
            recorded = journal[seq]
            return errored(
                f"nondeterminism at journal position {seq}: the journal has step "
                f"{recorded.name!r} but the workflow asked for step {name!r}"
            )
        case GuestCrashed(message=message):
            return errored(f"step at journal position {length} failed: {message}")


def _misplaced(what: str, seq: int, length: int) -> str:
    return f"guest ABI violation: {what} reported at position {seq}, the journal length is {length}"
