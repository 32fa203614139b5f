"""The life cycle of a workflow instance."""

from __future__ import annotations

from enum import StrEnum


class InstanceStatus(StrEnum):
    """Where an instance stands; `complete`, `errored` and `terminated` are final."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SLEEPING = "sleeping"
    PAUSED = "paused"
    ERRORED = "errored"
    TERMINATED = "terminated"
    COMPLETE = "complete"

    @property
    def is_final(self) -> bool:
        """Tell whether no further step can ever run."""
        return self in _FINAL


_FINAL = frozenset({InstanceStatus.ERRORED, InstanceStatus.TERMINATED, InstanceStatus.COMPLETE})
