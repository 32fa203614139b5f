"""Where guests run: short runs on the event loop's own thread, long ones in guest processes.

A guest run on the guest thread pays for the hand-over and, worse, for the interpreter lock:
every call between Python and wasmtime gives the lock up and waits to get it back from the busy
event loop, so a run of a few hundred microseconds took over a millisecond in a loaded worker.
Most runs are that short. So a batch first runs its guests on the loop's thread, each with at
most `SLICE_FUEL` of fuel and all of them within `INLINE_SECONDS`; a run that needs more fuel is
abandoned (a run has no effect until its batch is written, so nothing is lost but the slice)
and runs again, with its whole budget, as a long run. The batch's runs past the time budget
run inline too, after the loop has had its turn (with guest processes), or as long runs
(on the guest thread). A module whose run overran goes straight to the long runs for
`OVERRUN_MEMORY_SECONDS`. The event loop is therefore never held by guests for much longer than
`INLINE_SECONDS` per batch, whatever the guests do, and keeps consuming, confirming and acking
while long runs go on. A heavy batch's inline runs also stop for a light tenant's batch
(cycle/priority.py): the turn is given up until it is done, then the runs go on.

Long runs go to the worker's guest processes (`LongRuns`, sandbox/guest_pool.py) when it has
them: a few processes of lower CPU priority, taken by the tenants in turn, so a tenant whose
steps each burn seconds of CPU delays neither the short runs of the others (they go on inline
meanwhile) nor, beyond one run per process, their long ones. Without guest processes, long
runs go to the one guest thread.

wasmtime-py is not thread-safe (it keeps the exception a host import raised in a module-level
global), so the two threads never drive the sandbox at once: the process's pipelines take turns
(an asyncio lock, held while a batch's guests run inline or on the guest thread, and while a
module loads, but not while its runs wait for the guest processes), and a thread lock guards
the sandbox itself in case a cancelled wait left the guest thread running.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from datetime import datetime
from functools import partial
from typing import TypeVar

from stepfleet.cycle.guest import ran_out_of_fuel, run_work, run_works, work_run
from stepfleet.cycle.priority import LightFirst
from stepfleet.cycle.work import Apart, H, Ran, Work
from stepfleet.sandbox import LongRuns, Sandbox
from stepfleet.schemas import GuestReport, TenantLimits

T = TypeVar("T")

SLICE_FUEL = 10_000_000
"""Fuel of a run on the loop's thread: about 10 ms of guest code on the development machine."""
INLINE_SECONDS = 0.05
"""Time a batch's runs may take on the loop's thread before the rest go to the guest thread."""
TURN_SECONDS = 0.005
"""Time a batch's inline runs may hold the event loop at once: then the loop reads its sockets
before the next runs, so a delivery that arrived meanwhile (a light tenant's, which then has
the heavy batch step aside, see cycle/priority.py) waits a few milliseconds, not the batch's
whole inline budget (measured: slices of 20-140 ms while a flood ran)."""
OVERRUN_MEMORY_SECONDS = 60.0


class GuestRunner:
    """Runs guests for one process's cycles; `guest_thread` and `processes` None run every
    guest inline (a process with one cycle at a time: `stepfleet run`, tests)."""

    def __init__(
        self,
        sandbox: Sandbox,
        guest_thread: Executor | None,
        limits: Callable[[str], TenantLimits],
        clock: Callable[[], datetime],
        gate: LightFirst | None = None,
        processes: LongRuns | None = None,
    ) -> None:
        self._sandbox = sandbox
        self._gate = gate or LightFirst()
        self._thread = guest_thread
        self._processes = processes
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
        ran, apart = await self._run(works, set_apart=False)
        assert not apart
        return ran

    async def run_or_set_apart(self, works: list[Work[H]]) -> tuple[list[Ran[H]], list[Apart[H]]]:
        """Run the works' guests; with guest processes, return the long runs of works not set
        apart before as going on apart (`Apart`) instead of waiting for them."""
        return await self._run(works, set_apart=True)

    async def run_short(self, works: list[Work[H]]) -> tuple[list[Ran[H]], list[Work[H]]]:
        """Run the works' guests that end within a slice on the loop's thread; return those
        runs and the works left (long ones, those the batch's time budget or a light batch
        left out), which nothing has run. Inline only: without guest thread and processes,
        every run."""
        if self._thread is None and self._processes is None:
            return run_works(self._sandbox, works, self._limits, self._clock), []
        done: list[Ran[H]] = []
        left: list[Work[H]] = []
        began = time.monotonic()
        while True:
            async with self._turn:
                ran, long, late, stepping_aside = self._run_inline(works, TURN_SECONDS)
            done += ran
            left += long
            out_of_time = time.monotonic() - began > INLINE_SECONDS
            if not late or stepping_aside or out_of_time or not (ran or long):
                return done, left + late
            works = late
            await asyncio.sleep(0)  # the loop reads its sockets between turns

    async def _run(
        self, works: list[Work[H]], *, set_apart: bool
    ) -> tuple[list[Ran[H]], list[Apart[H]]]:
        if self._thread is None and self._processes is None:
            return run_works(self._sandbox, works, self._limits, self._clock), []
        ran: list[Ran[H]] = []
        if self._processes is None:
            while works:
                async with self._turn:
                    done, long_works, late, stepping_aside = self._run_inline(works)
                    ran += done
                    left = {id(w) for w in long_works + late}
                    works = [w for w in works if id(w) in left]
                    if works and not stepping_aside:
                        ran += await self._on_thread(partial(self._run_all, works))
                        works = []
                if works:
                    await self._gate.step_aside()
            return ran, []
        # With guest processes, only runs that need more than a slice go there: those left
        # for lack of time run inline too, after the loop has had its turn.
        long: list[tuple[Work[H], datetime, Future[GuestReport]]] = []
        while works:
            async with self._turn:
                done, long_works, works, stepping_aside = self._run_inline(works, TURN_SECONDS)
                ran += done
                # Queued while the turn is held: no module loads meanwhile.
                now = self._clock()
                long += [(w, now, self._submit(w)) for w in long_works]
            if stepping_aside:
                await self._gate.step_aside()
            elif works:
                await asyncio.sleep(0 if done or long_works else 0.005)
        # The turn is free: other batches' short runs go on while these run.
        apart: list[Apart[H]] = []
        waited: list[tuple[Work[H], datetime, Future[GuestReport]]] = []
        for work, began, future in long:
            if set_apart and work.apart is None:
                assert work.state is not None
                assert work.replay is not None
                length = len(work.replay.journal)
                apart.append(Apart(work, future, work.state, length, work.started_at or began))
            else:
                waited.append((work, began, future))
        if waited:
            reports = await asyncio.gather(*(asyncio.wrap_future(f) for _, _, f in waited))
            ran += [
                Ran(work, report, work.started_at or began, self._clock())
                for (work, began, _), report in zip(waited, reports, strict=True)
            ]
        return ran, apart

    def _run_all(self, works: list[Work[H]]) -> list[Ran[H]]:
        return run_works(self._sandbox, works, self._limits, self._clock)

    def _submit(self, work: Work[H]) -> Future[GuestReport]:
        assert self._processes is not None
        return self._processes.submit(work_run(work, self._limits))

    def _run_inline(
        self, works: list[Work[H]], budget: float = INLINE_SECONDS
    ) -> tuple[list[Ran[H]], list[Work[H]], list[Work[H]], bool]:
        """Run what fits in the slices on this thread; return the runs, the works that need
        more than a slice (long), those left for lack of time or for a light batch (late),
        and whether it stopped early for a light batch (see cycle/priority.py)."""
        if not works or not self._lock.acquire(blocking=False):
            return [], [], works, False
        ran: list[Ran[H]] = []
        long: list[Work[H]] = []
        late: list[Work[H]] = []
        try:
            began = time.monotonic()
            for index, work in enumerate(works):
                if index and self._gate.pressing():  # one run at least: always progress
                    return ran, long, late + works[index:], True
                now = time.monotonic()
                overran = self._overran.get(work.module)
                if overran is not None and now - overran < OVERRUN_MEMORY_SECONDS:
                    long.append(work)
                    continue
                if now - began > budget:
                    late.append(work)
                    continue
                item = run_work(self._sandbox, work, self._limits, self._clock, fuel_cap=SLICE_FUEL)
                if ran_out_of_fuel(item.report):
                    self._remember_overrun(work.module)
                    long.append(work)
                else:
                    ran.append(item)
        finally:
            self._lock.release()
        return ran, long, late, False

    def _remember_overrun(self, module: str) -> None:
        now = time.monotonic()
        if len(self._overran) >= 1024:
            self._overran = {
                m: at for m, at in self._overran.items() if now - at < OVERRUN_MEMORY_SECONDS
            }
        self._overran[module] = now
