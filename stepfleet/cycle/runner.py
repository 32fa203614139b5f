"""Where guests run: short runs on the event loop's own thread, long ones on the guest thread.

A guest run on the guest thread pays for the hand-over and, worse, for the interpreter lock:
every call between Python and wasmtime gives the lock up and waits to get it back from the busy
event loop, so a run of a few hundred microseconds took over a millisecond in a loaded worker.
Most runs are that short. So a batch first runs its guests on the loop's thread, each with at
most `SLICE_FUEL` of fuel and all of them within `INLINE_SECONDS`; a run that needs more fuel is
abandoned (a run has no effect until its batch is written, so nothing is lost but the slice)
and runs again, with its whole budget, on the guest thread, as do the batch's runs past the
time budget. A module whose run overran is sent straight to the guest thread for
`OVERRUN_MEMORY_SECONDS`. The event loop is therefore never held by guests for much longer than
`INLINE_SECONDS` per batch, whatever the guests do, and keeps consuming, confirming and acking
while long runs go on. A heavy batch's inline runs also stop for a light tenant's batch
(cycle/priority.py): the turn is given up until it is done, then the runs go on.

wasmtime-py is not thread-safe (it keeps the exception a host import raised in a module-level
global), so the two threads never drive the sandbox at once: the process's pipelines take turns
(an asyncio lock, held while a batch's guests run, inline or on the guest thread, and while a
module loads), and a thread lock guards the sandbox itself in case a cancelled wait left the
guest thread running.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import datetime
from functools import partial
from typing import TypeVar

from stepfleet.cycle.guest import ran_out_of_fuel, run_work, run_works
from stepfleet.cycle.priority import LightFirst
from stepfleet.cycle.work import H, Ran, Work
from stepfleet.sandbox import Sandbox
from stepfleet.schemas import TenantLimits

T = TypeVar("T")

SLICE_FUEL = 10_000_000
"""Fuel of a run on the loop's thread: about 10 ms of guest code on the development machine."""
INLINE_SECONDS = 0.05
"""Time a batch's runs may take on the loop's thread before the rest go to the guest thread."""
OVERRUN_MEMORY_SECONDS = 60.0


class GuestRunner:
    """Runs guests for one process's cycles; `guest_thread` None runs every guest inline
    (a process with one cycle at a time: `stepfleet run`, tests)."""

    def __init__(
        self,
        sandbox: Sandbox,
        guest_thread: Executor | None,
        limits: Callable[[str], TenantLimits],
        clock: Callable[[], datetime],
        gate: LightFirst | None = None,
    ) -> None:
        self._sandbox = sandbox
        self._gate = gate or LightFirst()
        self._thread = guest_thread
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._turn = asyncio.Lock()
        self._overran: dict[str, float] = {}
        """Module digest -> when a run of it last overran its slice (monotonic seconds)."""

    async def on_guest_thread(self, call: Callable[[], T]) -> T:
        """Run `call` where the sandbox may be driven, in turn, and await its result."""
        if self._thread is None:
            return call()
        async with self._turn:
            return await self._on_thread(call)

    async def _on_thread(self, call: Callable[[], T]) -> T:
        assert self._thread is not None

        def locked() -> T:
            with self._lock:
                return call()

        return await asyncio.get_running_loop().run_in_executor(self._thread, locked)

    async def run(self, works: list[Work[H]]) -> list[Ran[H]]:
        """Run every work's guest for its next outcome."""
        if self._thread is None:
            return run_works(self._sandbox, works, self._limits, self._clock)
        ran: list[Ran[H]] = []
        while works:
            async with self._turn:
                done, works, stepping_aside = self._run_inline(works)
                ran += done
                if works and not stepping_aside:
                    ran += await self._on_thread(partial(self._run_all, works))
                    works = []
            if works:
                await self._gate.step_aside()
        return ran

    def _run_all(self, works: list[Work[H]]) -> list[Ran[H]]:
        return run_works(self._sandbox, works, self._limits, self._clock)

    def _run_inline(self, works: list[Work[H]]) -> tuple[list[Ran[H]], list[Work[H]], bool]:
        """Run what fits in the slices on this thread; return the runs, the works left, and
        whether it stopped early for a light batch (see cycle/priority.py)."""
        if not works or not self._lock.acquire(blocking=False):
            return [], works, False
        ran: list[Ran[H]] = []
        rest: list[Work[H]] = []
        try:
            began = time.monotonic()
            for index, work in enumerate(works):
                if index and self._gate.pressing():  # one run at least: always progress
                    return ran, rest + works[index:], True
                now = time.monotonic()
                overran = self._overran.get(work.module)
                if now - began > INLINE_SECONDS or (
                    overran is not None and now - overran < OVERRUN_MEMORY_SECONDS
                ):
                    rest.append(work)
                    continue
                item = run_work(self._sandbox, work, self._limits, self._clock, fuel_cap=SLICE_FUEL)
                if ran_out_of_fuel(item.report):
                    self._remember_overrun(work.module)
                    rest.append(work)
                else:
                    ran.append(item)
        finally:
            self._lock.release()
        return ran, rest, False

    def _remember_overrun(self, module: str) -> None:
        now = time.monotonic()
        if len(self._overran) >= 1024:
            self._overran = {
                m: at for m, at in self._overran.items() if now - at < OVERRUN_MEMORY_SECONDS
            }
        self._overran[module] = now
