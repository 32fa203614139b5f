"""What an instance is waiting for, and how a step is retried: shared by engine and store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Final

DEFAULT_RETRY_LIMIT: Final = 5
DEFAULT_RETRY_DELAY_MS: Final = 10_000
DEFAULT_STEP_TIMEOUT_MS: Final = 600_000
DEFAULT_EVENT_TIMEOUT_MS: Final = 24 * 3600 * 1000
MAX_RETRY_LIMIT: Final = 1000


class Backoff(StrEnum):
    """How the delay grows between retries of a step."""

    CONSTANT = "constant"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


@dataclass(frozen=True, slots=True)
class StepConfig:
    """A step's retry policy and per-attempt timeout (the guest's `step_begin` config)."""

    retry_limit: int = DEFAULT_RETRY_LIMIT
    retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS
    backoff: Backoff = Backoff.EXPONENTIAL
    timeout_ms: int = DEFAULT_STEP_TIMEOUT_MS

    def delay_ms(self, retry: int) -> int:
        """The delay before retry number `retry` (1 for the retry after the first attempt)."""
        if self.backoff is Backoff.CONSTANT:
            return self.retry_delay_ms
        if self.backoff is Backoff.LINEAR:
            return self.retry_delay_ms * retry
        return int(self.retry_delay_ms * 2 ** min(retry - 1, 62))


DEFAULT_STEP_CONFIG: Final = StepConfig()


class WaitKind(StrEnum):
    """Why an instance is parked until a timer or an event."""

    SLEEP = "sleep"
    RETRY = "retry"
    EVENT = "event"
    THROTTLE = "throttle"
    """Over its tenant's running-steps or rate limit: runs when its turn comes."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """An instance parked at its journal position until `wake_at` (or a matching event)."""

    kind: WaitKind
    name: str
    wake_at: datetime
    event_type: str | None = None
    timeout_ms: int | None = None


class RunMode(IntEnum):
    """Forward runs the program; compensate runs the rollbacks of completed steps."""

    FORWARD = 0
    COMPENSATE = 1
