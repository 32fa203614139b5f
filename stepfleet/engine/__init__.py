"""The pure core: what a message means for an instance, and what a guest outcome means.

Nothing here does I/O; time comes in as arguments, so every rule is unit-testable.
"""

from __future__ import annotations

from stepfleet.engine.admission import (
    Admission,
    Admit,
    Duplicate,
    Keep,
    Reject,
    admit,
    check_size,
    due_us,
    event_entry,
    matches_wait,
)
from stepfleet.engine.decide import decide
from stepfleet.engine.decision import Decision, resolve_wait
from stepfleet.engine.state import EngineLimits, InstanceState

__all__ = [
    "Admission",
    "Admit",
    "Decision",
    "Duplicate",
    "EngineLimits",
    "InstanceState",
    "Keep",
    "Reject",
    "admit",
    "check_size",
    "decide",
    "due_us",
    "event_entry",
    "matches_wait",
    "resolve_wait",
]
