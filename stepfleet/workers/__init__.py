"""The worker process: wires broker, store, sandbox and engine together."""

from __future__ import annotations

from stepfleet.workers.settings import Settings
from stepfleet.workers.worker import Worker

__all__ = ["Settings", "Worker"]
