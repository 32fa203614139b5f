"""The epoch ticker: wall-clock deadlines for guests, through wasmtime's epoch interruption."""

from __future__ import annotations

import math
import threading
import time

import wasmtime

_WATCH_SECONDS = 0.01
"""How often the ticker checks the running guest's deadline: timeouts hold to about this."""
_EPOCH_SECONDS = 1.0
"""Epoch tick. Coarse on purpose: stopping a guest moves the epoch past the run's deadline
one increment at a time (at most run_timeout / tick of them), and the watch keeps timeouts
precise."""


def ticks(ms: int) -> int:
    """Epoch ticks for `ms` milliseconds, rounded up, plus one for the tick under way."""
    return math.ceil(ms / 1000 / _EPOCH_SECONDS) + 1


class EpochTicker:
    """Advances the engine's epoch with wall time, and stops the running guest at its deadline.

    Compiled code copies its store's epoch deadline when a function is entered and reads it
    again only once the epoch passes that copy. A deadline shortened by a host import (a step's
    timeout, set in `step_begin`) therefore does not reach the functions already running: they
    keep the run's long deadline. So the ticker also watches the deadline in wall time and, once
    it has passed, moves the epoch past every deadline set during the run, so that whatever
    function is running traps at its next loop iteration or call.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._started = time.monotonic()
        # The engine's epoch, which only this ticker advances (under the lock).
        self._epoch = 0
        # Epochs added to stop runs, on top of those that wall time accounts for.
        self._skipped = 0
        # The furthest epoch deadline set during the current run.
        self._furthest = 0
        # The current run's deadline in monotonic seconds; None: no run, or already stopped.
        self._until: float | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._thread.start()

    def set_deadline(self, store: wasmtime.Store, ms: int) -> None:
        """Make the guest running in `store` trap `ms` milliseconds from now, wherever it is."""
        deadline = ticks(ms)
        with self._lock:
            store.set_epoch_deadline(deadline)
            self._furthest = max(self._furthest, self._epoch + deadline)
            self._until = time.monotonic() + ms / 1000

    def clear(self) -> None:
        """End the watch when the run ends, so that a late stop cannot hit the next run."""
        with self._lock:
            self._until = None
            self._furthest = 0

    def _tick(self) -> None:
        while not self._stopped.wait(_WATCH_SECONDS):
            with self._lock:
                now = time.monotonic()
                # Catch up with wall time, so that epoch deadlines do not drift late.
                target = int((now - self._started) / _EPOCH_SECONDS) + self._skipped
                if self._until is not None and now >= self._until:
                    # A few hundred increments at most (the run timeout's ticks).
                    stop_at = max(target, self._furthest + 1)
                    self._skipped += stop_at - target
                    target = stop_at
                    self._until = None
                while self._epoch < target:
                    self._engine.increment_epoch()
                    self._epoch += 1

    def stop(self) -> None:
        self._stopped.set()
