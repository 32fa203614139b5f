"""Operator actions on instances: status, listing, pause, resume, terminate, restart, delete,
and moving running instances to other code."""

from __future__ import annotations

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
