"""Operator actions on instances: status, listing, pause, resume, terminate, restart, delete,
and moving running instances to other code."""

from __future__ import annotations

from stepfleet.control.actions import Control, ControlError
from stepfleet.control.moves import ModuleMoves, MoveCheck, Verdict

__all__ = ["Control", "ControlError", "ModuleMoves", "MoveCheck", "Verdict"]
