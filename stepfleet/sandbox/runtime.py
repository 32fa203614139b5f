"""WasmSandbox: runs guests under fuel, memory, stack and wall-clock limits, with the ABI's
host imports (host_imports.py, wasi_imports.py) over the modules of its engine (wasm_engine.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import structlog
import wasmtime

from stepfleet.sandbox.epoch import EpochTicker
from stepfleet.sandbox.exports import RunExports
from stepfleet.sandbox.guest_memory import check_range
from stepfleet.sandbox.host_imports import HostImports
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.linking import Stop, Violation
from stepfleet.sandbox.module_cache import CompiledModuleCache
from stepfleet.sandbox.port import GuestRun
from stepfleet.sandbox.run_state import RunState
from stepfleet.sandbox.wasi_imports import WasiImports
from stepfleet.sandbox.wasm_engine import WasmEngine, first_line, set_run_limits
from stepfleet.schemas import GuestCrashed, GuestOutcome, GuestReport, RunOutcome, StepFailed

log = structlog.get_logger("stepfleet.sandbox")

_PAGE = 65536
_TRAP_LIMITS = {
    wasmtime.TrapCode.OUT_OF_FUEL: "cpu",
    wasmtime.TrapCode.STACK_OVERFLOW: "stack",
    wasmtime.TrapCode.INTERRUPT: "timeout",
}


class WasmSandbox(WasmEngine):
    """Runs guest modules per docs/guest-abi.md; drive it from one thread only."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        module_cache: CompiledModuleCache | None = None,
    ) -> None:
        super().__init__(limits or SandboxLimits(), module_cache)
        self._run = RunState()
        self._ticker = EpochTicker(self._engine)
        HostImports(self.limits, self._current_run, self._ticker, clock=clock).define(self._linker)
        WasiImports(self.limits, self._current_run).define(self._linker)

    def _current_run(self) -> RunState:
        # The imports read the run under way through this, as `run` replaces it.
        return self._run

    def close(self) -> None:
        """Stop the epoch ticker; the sandbox cannot run guests afterwards."""
        self._ticker.stop()

    def run(self, job: GuestRun) -> GuestReport:
        """Run one guest over its replay buffer and return what it reported."""
        compiled = self._compiled.get(job.digest)
        if compiled is None:
            raise KeyError(f"module {job.digest} is not loaded")
        store = wasmtime.Store(self._engine)
        calls = job.host_calls_per_step
        self._run = run = RunState(
            store,
            job.journal_length,
            job.attempt,
            host_calls_per_step=self.limits.host_calls_per_step if calls is None else calls,
            answers=job.answers,
            step_deadline=job.step_deadline,
        )
        # A tenant's own limits, when it has any, replace the fleet's for its runs.
        fuel = job.fuel_per_run or self.limits.fuel_per_run
        memory_cap = job.memory_bytes or self.limits.memory_bytes
        store.set_fuel(fuel)
        set_run_limits(store, memory_cap, self.limits.table_elements)
        memory: wasmtime.Memory | None = None

        def report(outcome: RunOutcome) -> GuestReport:
            used = 0 if run.store is None else fuel - store.get_fuel()  # None: store closed
            return GuestReport(outcome, tuple(run.recorded), run.logs, used)

        try:
            self._ticker.set_deadline(store, self.limits.run_timeout_ms)
            try:
                instance = compiled.pre.instantiate(store)
            except wasmtime.WasmtimeError as exc:  # its memory or tables are over the limits
                return report(GuestCrashed(f"module cannot start: {first_line(exc)}"))
            layout = compiled.exports
            if layout.initialize_refused is not None:
                return report(GuestCrashed(f"guest error: {layout.initialize_refused}"))
            exports = RunExports(instance, store, layout)
            run.memory = memory = exports.memory
            exports.initialize(store)
            size = len(job.replay_buffer)
            pointer = exports.alloc(store, size)
            if pointer == 0:
                return report(GuestCrashed(f"sf_alloc({size}) returned no memory", "memory"))
            pointer = check_range(memory, store, pointer, size, "replay buffer")
            memory.write(store, job.replay_buffer, pointer)
            exports.run(store, pointer, size)
        except Stop as stop:
            return report(stop.outcome)
        except Violation as exc:
            return report(GuestCrashed(str(exc), exc.limit, exc.where or _where(run)))
        except wasmtime.Trap as trap:
            crash = self._crashed(trap, memory, store, fuel=fuel, memory_cap=memory_cap)
            return report(self._in_step(run, replace(crash, where=_where(run))))
        except wasmtime.WasmtimeError as exc:
            return report(GuestCrashed(f"guest error: {exc}", where=_where(run)))
        except Exception as exc:
            # A host bug must cost this run only, never the worker's batch of other tenants.
            log.exception("guest_run_failed", tenant=job.tenant, module_digest=job.digest)
            return report(GuestCrashed(f"host error: {type(exc).__name__}"))
        finally:
            self._ticker.clear()
            run.store = run.memory = None
            store.close()
        return report(GuestCrashed("guest returned without an outcome", where=_where(run)))

    @staticmethod
    def _in_step(run: RunState, crash: GuestCrashed) -> GuestOutcome:
        """A trap inside a step (a breached limit, a timeout) is a failed, retryable attempt."""
        step = run.step
        if step is None:
            return crash
        message = crash.message
        if crash.limit == "timeout":
            message = f"step {step.name!r} timed out after {step.config.timeout_ms} ms"
        return StepFailed(step.seq, step.name, message, config=step.config, limit=crash.limit)

    def _crashed(
        self,
        trap: wasmtime.Trap,
        memory: wasmtime.Memory | None,
        store: wasmtime.Store,
        *,
        fuel: int,
        memory_cap: int,
    ) -> GuestCrashed:
        code = trap.trap_code
        limit = _TRAP_LIMITS.get(code) if code is not None else None
        if limit == "cpu":
            return GuestCrashed(
                f"CPU limit exceeded: the run used all {fuel} units of fuel",
                "cpu",
            )
        if limit == "timeout":
            return GuestCrashed(
                f"the run took longer than {self.limits.run_timeout_ms} ms", "timeout"
            )
        if limit == "stack":
            return GuestCrashed(
                f"stack limit exceeded ({self.limits.stack_bytes} bytes): runaway recursion?",
                "stack",
            )
        # A failed memory.grow returns -1 and the guest usually traps soon after: a memory
        # already at the cap is the likely cause, and naming it is what the tenant needs.
        if memory is not None and memory.data_len(store) + _PAGE > memory_cap:
            return GuestCrashed(
                f"memory limit exceeded: the guest reached {memory_cap} bytes "
                f"and then trapped ({first_line(trap)})",
                "memory",
            )
        return GuestCrashed(f"guest trapped: {first_line(trap)}")


def _where(run: RunState) -> str:
    """What failed, by where the run stood: inside a step, or in the workflow's own code."""
    step = run.step
    if step is not None:
        return f"step {step.name!r} attempt {run.attempt} failed"
    return f"the workflow code failed between steps, at journal position {run.next_seq}"
