"""The worker process: wires broker, store, sandbox and engine together."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
    from stepfleet.workers.settings import Settings
    from stepfleet.workers.worker import Worker

__all__ = ["Settings", "Worker"]

__getattr__ = lazy_exports(
    __name__,
    {
        "Settings": "stepfleet.workers.settings",
        "Worker": "stepfleet.workers.worker",
    },
)
