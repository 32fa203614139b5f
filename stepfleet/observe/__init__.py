"""Metrics and traces: what the fleet tells operators (docs/operations.md, *Metrics* and
*Traces*). The rest of the package sees only the port (`port.py`)."""

from __future__ import annotations

from stepfleet.observe.port import (
    NO_OBSERVER,
    PHASES,
    BatchCounts,
    Child,
    Observer,
    Span,
    wall_ns,
)

__all__ = ["NO_OBSERVER", "PHASES", "BatchCounts", "Child", "Observer", "Span", "wall_ns"]
