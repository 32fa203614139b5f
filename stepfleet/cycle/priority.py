"""Light work first: batches of light tenants run ahead of heavy batches on the event loop.

A worker process runs its batches on one event loop, and asyncio has no priorities: a light
tenant's step (one delivery, a few milliseconds of work) that is ready behind a heavy tenant's
64-delivery batch waits for every piece of that batch the loop runs first, guest runs included.
So heavy batches step aside at their checkpoints (before their checks, between guest runs,
before publishing) while a light batch is in flight (see workers/inbox.py for which tenants are
light), and go on when it is done, or after 50 ms at most: a heavy batch may hold a row lock
the light one waits for. Light batches are small by construction, so that costs
heavy tenants little; and should light work keep arriving, it is given at most `SHARE` of the
loop's time (measured over about a second), past which heavy batches no longer wait, so a crowd
of light tenants cannot starve a heavy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

SHARE = 0.5
"""Most of the loop's time light batches may take ahead of heavy ones."""
_WINDOW_SECONDS = 1.0
_MOST_WAIT_SECONDS = 0.05

_light_task: contextvars.ContextVar[bool] = contextvars.ContextVar("light_task", default=False)


class LightFirst:
    """Heavy batches wait at checkpoints while a light batch is in flight."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._done = asyncio.Event()
        self._done.set()
        self._busy = 0.0
        """Seconds light batches ran, decayed over `_WINDOW_SECONDS`."""
        self._busy_at = time.monotonic()
        self._since = self._busy_at
        """When light batches began to be in flight (without a pause)."""

    @contextmanager
    def light(self) -> Iterator[None]:
        """Mark the current task's batch as light while the block runs."""
        token = _light_task.set(True)
        if not self._in_flight:
            self._since = time.monotonic()
            self._done.clear()
        self._in_flight += 1
        try:
            yield
        finally:
            _light_task.reset(token)
            self._in_flight -= 1
            if not self._in_flight:
                now = time.monotonic()
                self._busy = self._decayed(now) + (now - self._since)
                self._busy_at = now
                self._done.set()

    def pressing(self) -> bool:
        """Whether the current task should step aside now: it runs a heavy batch, a light
        one is in flight, and light batches are within their share."""
        if not self._in_flight or _light_task.get():
            return False
        now = time.monotonic()
        return self._decayed(now) + (now - self._since) < SHARE * _WINDOW_SECONDS

    async def step_aside(self) -> None:
        """Wait until no light batch is in flight, if the current task should; at most
        `_MOST_WAIT_SECONDS` (a heavy batch may hold a row lock the light one waits for)."""
        if self.pressing():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), _MOST_WAIT_SECONDS)

    def _decayed(self, now: float) -> float:
        return self._busy * math.exp(-(now - self._busy_at) / _WINDOW_SECONDS)
