"""Operator actions on instances: status, listing, pause, resume, terminate, restart, delete."""

from __future__ import annotations

from stepfleet.control.actions import Control, ControlError

__all__ = ["Control", "ControlError"]
