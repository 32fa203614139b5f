"""Where a worker's time goes: seconds per phase of its batches, summed since it started.

The worker keeps one `PhaseTimes` and writes it into its health file; the benchmarks read it
before and after a run and print milliseconds per delivery, so the next person sees where a
millisecond goes. Taking the times costs a monotonic clock read per phase per batch. Each
batch's time in each phase also goes to the worker's observer (`stepfleet_step_phase_seconds`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

from stepfleet.observe import NO_OBSERVER, Observer


@dataclass(slots=True)
class PhaseTimes:
    """Counts and seconds, each summed over the batches (not per delivery)."""

    batches: int = 0
    deliveries: int = 0
    inbox_wait: float = 0.0
    """Summed over deliveries: from arriving in the worker's inbox to being taken by a batch."""
    checks: float = 0.0
    """Parsing, producer and routing checks."""
    transaction: float = 0.0
    """The cycle's transaction (admission, journals, modules, the write, the commit), its
    guest runs left out."""
    guest: float = 0.0
    """Guest runs, the hand-over to the guest thread included."""
    publish: float = 0.0
    """Publishing the next steps and dead letters, until the broker confirmed them."""
    ack: float = 0.0
    observer: Observer = field(default=NO_OBSERVER, repr=False, compare=False)

    def add(self, phase: str, seconds: float) -> None:
        """Add one batch's `seconds` in `phase`."""
        setattr(self, phase, getattr(self, phase) + seconds)
        self.observer.phase(phase, seconds)

    @contextmanager
    def timing(self, phase: str) -> Iterator[list[float]]:
        """Add the time the block takes to `phase` (also when it raises); the block gets
        [start, end] (monotonic seconds; end set when it ends), for its trace."""
        start = time.monotonic()
        span = [start, start]
        try:
            yield span
        finally:
            span[1] = time.monotonic()
            self.add(phase, span[1] - start)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "observer"}
