"""The engine's view of an instance, and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from stepfleet.schemas import (
    DEFAULT_EVENT_TIMEOUT_MS,
    InstanceKey,
    InstanceStatus,
    RunMode,
    Waiting,
)

DAY_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class InstanceState:
    """What the engine needs to know of an instance row; `position` is the journal length."""

    key: InstanceKey
    module: str
    status: InstanceStatus
    position: int
    generation: int = 0
    attempt: int = 1
    """The attempt number the next new step runs as."""
    waiting: Waiting | None = None
    mode: RunMode = RunMode.FORWARD
    end_status: InstanceStatus | None = None
    """While compensating: the status the instance ends in (errored or terminated)."""
    error: str | None = None
    state_bytes: int = 0


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Per-instance limits (docs/guest-abi.md lists the defaults and their settings)."""

    max_steps: int = 10_000
    max_state_bytes: int = 1024**3
    max_sleep_ms: int = 365 * DAY_MS
    default_event_timeout_ms: int = DEFAULT_EVENT_TIMEOUT_MS
