"""Journal entries: the durable record a guest replays."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum


class EntryKind(IntEnum):
    """What a journal position holds; the numbers are the guest ABI's replay-buffer kinds."""

    STEP_SUCCEEDED = 1
    STEP_FAILED = 2


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One recorded position: a step's result (JSON text) or its final error message."""

    seq: int
    kind: EntryKind
    name: str
    value: str
    attempt: int = 1
    started_at: datetime | None = None
    finished_at: datetime | None = None
