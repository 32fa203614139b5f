"""The pure core: what a message means for an instance, and what a guest outcome means.

Nothing here does I/O; time comes in as arguments, so every rule is unit-testable.
"""

from __future__ import annotations

from stepfleet.engine.admission import Admission, Admit, Duplicate, Reject, admit
from stepfleet.engine.decide import Decision, InstanceState, decide

__all__ = [
    "Admission",
    "Admit",
    "Decision",
    "Duplicate",
    "InstanceState",
    "Reject",
    "admit",
    "decide",
]
