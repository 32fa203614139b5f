"""What the journal may hold: text without NUL, an instance within its limits, and how a
recorded entry reads in an error."""

from __future__ import annotations

from dataclasses import replace

from stepfleet.engine.state import EngineLimits
from stepfleet.schemas import (
    Completed,
    EntryKind,
    EventAwaited,
    GuestCrashed,
    GuestOutcome,
    JournalEntry,
    SleepRequested,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
)

__all__ = ["describe", "journal_text", "over_limits"]

_NUL = "\x00"


def journal_text(outcome: GuestOutcome) -> GuestOutcome | str:
    """The outcome with text the journal can hold, or why it cannot be recorded.

    Journal text never holds NUL (PostgreSQL text cannot). A name or a value must come back
    unchanged on replay, so one with NUL is refused (values are JSON, which escapes NUL as
    \\u0000: a raw one means the guest broke the ABI); a message is only read back, so NUL
    becomes U+FFFD.
    """
    match outcome:
        case StepSucceeded(name=name) | SleepRequested(name=name) if _NUL in name:
            return f"guest ABI violation: the name at position {outcome.seq} contains NUL"
        case StepSucceeded(result=text) | Completed(output=text) if _NUL in text:
            return f"guest ABI violation: the value at position {outcome.seq} contains NUL"
        case EventAwaited(name=name, event_type=kind) if _NUL in name + kind:
            return f"guest ABI violation: the wait at position {outcome.seq} names NUL"
        case StepFailed(name=name) if _NUL in name:
            return f"guest ABI violation: the name at position {outcome.seq} contains NUL"
        case StepFailed(message=text) | WorkflowFailed(message=text) if _NUL in text:
            return replace(outcome, message=text.replace(_NUL, "\ufffd"))
        case GuestCrashed(message=text) if _NUL in text:
            return replace(outcome, message=text.replace(_NUL, "\ufffd"))
    return outcome


def over_limits(position: int, state_bytes: int, limits: EngineLimits) -> str | None:
    if position > limits.max_steps:
        return f"the instance reached its limit of {limits.max_steps} journal entries"
    if state_bytes > limits.max_state_bytes:
        return (
            f"the instance's state would be {state_bytes} bytes, "
            f"the limit is {limits.max_state_bytes}"
        )
    return None


_KIND_WORDS = {
    EntryKind.STEP_SUCCEEDED: "step",
    EntryKind.STEP_FAILED: "step",
    EntryKind.SLEPT: "sleep",
    EntryKind.EVENT_RECEIVED: "wait for event",
    EntryKind.EVENT_TIMED_OUT: "wait for event",
    EntryKind.NOW: "now",
    EntryKind.RANDOM: "random",
    EntryKind.COMPENSATED: "compensation",
}


def describe(entry: JournalEntry) -> str:
    word = _KIND_WORDS[entry.kind]
    return f"{word} {entry.name!r}" if entry.name else word
