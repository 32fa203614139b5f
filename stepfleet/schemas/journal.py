"""Journal entries: the durable record a guest replays."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, IntFlag


class EntryKind(IntEnum):
    """What a journal position holds; the numbers are the guest ABI's replay-buffer kinds."""

    STEP_SUCCEEDED = 1
    STEP_FAILED = 2
    SLEPT = 3
    EVENT_RECEIVED = 4
    EVENT_TIMED_OUT = 5
    NOW = 6
    RANDOM = 7
    COMPENSATED = 8


class EntryFlags(IntFlag):
    """Facts about a recorded step the host keeps beside its value (`step_done` flags)."""

    NONE = 0
    HAS_ROLLBACK = 1
    SENSITIVE = 2
    COMPENSATION = 4


REDACTED = "<redacted>"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One recorded position: a step's result, a final error, a sleep, an event, a value."""

    seq: int
    kind: EntryKind
    name: str
    value: str
    attempt: int = 1
    started_at: datetime | None = None
    finished_at: datetime | None = None
    flags: EntryFlags = EntryFlags.NONE

    @property
    def shown_value(self) -> str:
        """The value as status views, listings and logs may show it."""
        return REDACTED if self.flags & EntryFlags.SENSITIVE else self.value


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    """An attempt of the step at `seq` that failed and was retried."""

    seq: int
    name: str
    attempt: int
    error: str
    started_at: datetime
    finished_at: datetime
