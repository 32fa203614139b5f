"""Operator actions on instances: status, listing, pause, resume, terminate, restart, delete,
and moving running instances to other code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
    from stepfleet.control.actions import Control, ControlError
    from stepfleet.control.audit import operator_name
    from stepfleet.control.dead_letters import UNREPLAYABLE, DeadLetters
    from stepfleet.control.moves import ModuleMoves, MoveCheck, Verdict

__all__ = [
    "UNREPLAYABLE",
    "Control",
    "ControlError",
    "DeadLetters",
    "ModuleMoves",
    "MoveCheck",
    "Verdict",
    "operator_name",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "Control": "stepfleet.control.actions",
        "ControlError": "stepfleet.control.actions",
        "operator_name": "stepfleet.control.audit",
        "UNREPLAYABLE": "stepfleet.control.dead_letters",
        "DeadLetters": "stepfleet.control.dead_letters",
        "ModuleMoves": "stepfleet.control.moves",
        "MoveCheck": "stepfleet.control.moves",
        "Verdict": "stepfleet.control.moves",
    },
)
