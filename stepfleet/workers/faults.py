"""Crash points for fault-injection tests: the worker kills itself with SIGKILL at a named
point of the per-step path, with a given probability.

Off unless STEPFLEET_CRASH_POINTS names points, e.g. `after-commit:0.02,after-publish:0.02`.
The points are the windows a real crash can hit: after the transaction commits but before
the next messages are published, and after publishing but before the acks; and
`step-before-commit`, before the transaction of a batch that holds a step message: a step
that kills every worker that takes it (memory, a host bug), until RabbitMQ dead-letters it at
its delivery limit.
"""

from __future__ import annotations

import os
import random
import signal
import sys

POINTS = ("after-commit", "after-publish", "step-before-commit")


def parse(spec: str) -> dict[str, float]:
    """Parse `point:probability,...`; unknown points or bad numbers raise ValueError."""
    chances: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, chance = part.partition(":")
        if point not in POINTS:
            raise ValueError(f"unknown crash point {point!r} (known: {', '.join(POINTS)})")
        chances[point] = float(chance or "1")
    return chances


class CrashPoints:
    """Where this process may crash on purpose."""

    def __init__(self, chances: dict[str, float]) -> None:
        self._chances = chances
        self._random = random.Random()

    def reach(self, point: str) -> None:
        """Die here, as a kill -9 would, with the configured probability."""
        chance = self._chances.get(point)
        if chance and self._random.random() < chance:
            sys.stderr.write(f"stepfleet: crash point {point}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
