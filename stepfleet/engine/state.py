"""The engine's view of an instance."""

from __future__ import annotations

from dataclasses import dataclass

from stepfleet.schemas import InstanceKey, InstanceStatus


@dataclass(frozen=True, slots=True)
class InstanceState:
    """What the engine needs to know of an instance row; `position` is the journal length."""

    key: InstanceKey
    module: str
    status: InstanceStatus
    position: int
