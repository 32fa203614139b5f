"""WasmSandbox: wasmtime with fuel, memory and stack limits, and the ABI's host imports."""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NoReturn

import structlog
import wasmtime

from stepfleet.sandbox.abi import (
    ABI_VERSION,
    ALLOWED_IMPORTS,
    HOST_IMPORTS,
    HOST_MODULE,
    REQUIRED_EXPORTS,
    WASI_IMPORTS,
    WASI_MODULE,
)
from stepfleet.sandbox.compiler import ModuleCompiler
from stepfleet.sandbox.errors import CompileFailed, InvalidModule, SandboxError
from stepfleet.sandbox.guest_json import JsonTooDeep, parse_guest_json
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.module_cache import CompiledModuleCache, engine_fingerprint
from stepfleet.sandbox.port import Egress, GuestRun
from stepfleet.sandbox.step_config import parse_step_config
from stepfleet.schemas import (
    Completed,
    EntryFlags,
    EntryKind,
    EventAwaited,
    GuestCrashed,
    GuestOutcome,
    GuestReport,
    HttpRequest,
    HttpResponse,
    Nondeterministic,
    Recorded,
    SleepRequested,
    StepConfig,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
    digest_of,
)

log = structlog.get_logger("stepfleet.sandbox")

_VALTYPES = {
    "i32": wasmtime.ValType.i32(),
    "i64": wasmtime.ValType.i64(),
}
_EBADF = 8
_EINVAL = 28
_ADDRESS_SPACE = 1 << 32
"""Guest pointers and lengths are unsigned 32-bit; a range may not run past 4 GiB."""
_PAGE = 65536
_TRAP_LIMITS = {
    wasmtime.TrapCode.OUT_OF_FUEL: "cpu",
    wasmtime.TrapCode.STACK_OVERFLOW: "stack",
    wasmtime.TrapCode.INTERRUPT: "timeout",
}
_WATCH_SECONDS = 0.01
"""How often the ticker checks the running guest's deadline: timeouts hold to about this."""
_EPOCH_SECONDS = 1.0
"""Epoch tick. Coarse on purpose: stopping a guest moves the epoch past the run's deadline
one increment at a time (at most run_timeout / tick of them), and the watch keeps timeouts
precise."""
_MAX_RANDOM_BYTES = 256
_MAX_SLEEP_VALUE_MS = 10**13
"""Largest sleep duration or Unix time, of either sign (ms, about 317 years): beyond it date
arithmetic can overflow. The sleep limit itself (365 days) is the engine's to apply."""
_MAX_FD_WRITE_IOVS = 64
_KNOWN_FLAGS = EntryFlags.HAS_ROLLBACK | EntryFlags.SENSITIVE | EntryFlags.COMPENSATION


def _ticks(ms: int) -> int:
    """Epoch ticks for `ms` milliseconds, rounded up, plus one for the tick under way."""
    return math.ceil(ms / 1000 / _EPOCH_SECONDS) + 1


class _Stop(BaseException):
    """Raised by a terminal import to unwind the guest; carries the run's outcome.

    A BaseException so that nothing between the import and `run` mistakes it for a failure.
    """

    def __init__(self, outcome: GuestOutcome) -> None:
        self.outcome = outcome


class _Violation(Exception):
    """The guest broke the ABI (bad pointer, bad UTF-8, bad JSON, over a size limit)."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class _Step:
    """The step the guest has begun (`step_begin`) and not yet reported."""

    __slots__ = ("config", "deadline", "http_calls", "http_response", "name", "seq")

    def __init__(self, seq: int, name: str, config: StepConfig) -> None:
        self.seq = seq
        self.name = name
        self.config = config
        # When the step's timeout runs out (monotonic seconds): bounds its HTTP calls.
        self.deadline = time.monotonic() + config.timeout_ms / 1000
        self.http_calls = 0
        # The answer of the last `http_request`, until `http_response` copies it.
        self.http_response: bytes | None = None


class _RunState:
    """What the host imports of the current run read and write."""

    __slots__ = (
        "attempt",
        "host_calls_per_step",
        "logs",
        "next_seq",
        "recorded",
        "step",
        "store",
        "tenant",
    )

    def __init__(
        self,
        store: wasmtime.Store | None = None,
        next_seq: int = 0,
        attempt: int = 1,
        *,
        tenant: str = "",
        host_calls_per_step: int = 0,
    ):
        self.store = store
        self.logs: list[tuple[int, str]] = []
        self.recorded: list[Recorded] = []
        self.next_seq = next_seq
        self.attempt = attempt
        self.step: _Step | None = None
        self.tenant = tenant
        self.host_calls_per_step = host_calls_per_step

    def record(self, seq: int, kind: EntryKind, value: str) -> None:
        """Record a `now` or `random` value, which must take the next journal position."""
        if seq != self.next_seq:
            raise _Violation(
                f"guest ABI violation: a value recorded at position {seq}, "
                f"the next position is {self.next_seq}"
            )
        self.recorded.append(Recorded(seq, kind, value))
        self.next_seq += 1


class _EpochTicker:
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
        ticks = _ticks(ms)
        with self._lock:
            store.set_epoch_deadline(ticks)
            self._furthest = max(self._furthest, self._epoch + ticks)
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


class WasmSandbox:
    """Runs guest modules per docs/guest-abi.md; drive it from one thread only."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        module_cache: CompiledModuleCache | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self._clock = clock
        # Guests' HTTP calls go through it (the sandbox does no network I/O); None: refused.
        self._egress = egress
        # Every Config option goes through this mapping: it is also the on-disk cache's key.
        engine_options: dict[str, bool | int | str] = {
            "consume_fuel": True,
            "epoch_interruption": True,
            "max_wasm_stack": self.limits.stack_bytes,
            "cranelift_opt_level": "speed",
        }
        config = wasmtime.Config()
        for option, value in engine_options.items():
            setattr(config, option, value)
        self._engine = wasmtime.Engine(config)
        self.module_cache = module_cache
        self._engine_fingerprint = engine_fingerprint(engine_options, ABI_VERSION)
        self.compiler = ModuleCompiler(
            engine_options, self.limits, fingerprint=self._engine_fingerprint, cache=module_cache
        )
        self._linker = wasmtime.Linker(self._engine)
        self._compiled: OrderedDict[str, wasmtime.InstancePre] = OrderedDict()
        self._run = _RunState()
        self._ticker = _EpochTicker(self._engine)
        self._define_host_imports()
        self._define_wasi_imports()

    def close(self) -> None:
        """Stop the epoch ticker; the sandbox cannot run guests afterwards."""
        self._ticker.stop()

    def _ticks(self, ms: int) -> int:
        return _ticks(ms)

    # -- modules -------------------------------------------------------------------------

    def validate(self, wasm: bytes) -> None:
        """Check size, imports, exports and ABI version, and that the module compiles."""
        self._check_abi_version(self._linker.instantiate_pre(self._compile(wasm)))

    def is_loaded(self, digest: str) -> bool:
        """Tell whether `digest` is compiled and cached (and mark it recently used)."""
        if digest in self._compiled:
            self._compiled.move_to_end(digest)
            return True
        return False

    def load(self, digest: str, wasm: bytes, artifact: bytes | None = None) -> None:
        """Compile and cache a module, refusing bytes that do not match their digest.

        `artifact` is what `self.compiler.submit(digest, wasm)` made, off this thread (it
        compiles or reads the disk cache): here it is only deserialized. Without it,
        a precompiled artifact in the `module_cache` replaces the compile (and a fresh compile
        is written there); either way the module is validated the same.
        """
        if digest_of(wasm) != digest:
            raise InvalidModule(f"module bytes do not hash to {digest}")
        module: wasmtime.Module | None
        if artifact is not None:
            try:
                module = self._deserialize(artifact)
            except SandboxError:
                # It may have come from the disk cache: do not hand it out again.
                if self.module_cache is not None:
                    self.module_cache.discard(self._engine_fingerprint, digest)
                raise
            fresh = False
        else:
            module = self._module_from_disk(digest, wasm)
            fresh = module is None
        if module is None:
            module = self._compile(wasm)
        pre = self._linker.instantiate_pre(module)
        self._check_abi_version(pre)
        if self.module_cache is not None and fresh:
            self.module_cache.store(self._engine_fingerprint, digest, module)
        self._compiled[digest] = pre
        self._compiled.move_to_end(digest)
        while len(self._compiled) > self.limits.compiled_cache_entries:
            self._compiled.popitem(last=False)

    def _compile(self, wasm: bytes) -> wasmtime.Module:
        # A child process compiles, under the compile limits (sandbox/compiler.py).
        return self._deserialize(self.compiler.compile(wasm))

    def _deserialize(self, artifact: bytes) -> wasmtime.Module:
        """Load what this fleet's compiler made, checked like a fresh compile.

        Deserializing runs no validation: only the fleet's own artifacts may come here.
        """
        try:
            module = wasmtime.Module.deserialize(self._engine, artifact)
        except wasmtime.WasmtimeError as exc:
            raise CompileFailed(f"the compiled module does not load: {_first_line(exc)}") from None
        _check_imports(module)
        _check_exports(module)
        return module

    def _module_from_disk(self, digest: str, wasm: bytes) -> wasmtime.Module | None:
        """The module's artifact from the on-disk cache, checked like a fresh compile."""
        cache = self.module_cache
        if cache is None or len(wasm) > self.limits.module_bytes:
            return None
        module = cache.load(self._engine, self._engine_fingerprint, digest)
        if module is not None:
            try:
                _check_imports(module)
                _check_exports(module)
            except InvalidModule:
                cache.discard(self._engine_fingerprint, digest)
                raise
        return module

    def _check_abi_version(self, pre: wasmtime.InstancePre) -> None:
        """Ask the module once, at load, which ABI it speaks (not on every run)."""
        store = wasmtime.Store(self._engine)
        store.set_fuel(1_000_000)
        store.set_epoch_deadline(self._ticks(10_000))
        try:
            exports = pre.instantiate(store).exports(store)
            version = _call(exports, store, "sf_abi_version")
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise InvalidModule(f"module failed to start: {_first_line(exc)}") from None
        finally:
            store.close()
        if version != ABI_VERSION:
            raise InvalidModule(
                f"module speaks guest ABI {version}, this host speaks {ABI_VERSION}"
            )

    # -- runs ----------------------------------------------------------------------------

    def run(self, job: GuestRun) -> GuestReport:
        """Run one guest over its replay buffer and return what it reported."""
        pre = self._compiled.get(job.digest)
        if pre is None:
            raise KeyError(f"module {job.digest} is not loaded")
        store = wasmtime.Store(self._engine)
        calls = job.host_calls_per_step
        self._run = run = _RunState(
            store,
            job.journal_length,
            job.attempt,
            tenant=job.tenant,
            host_calls_per_step=self.limits.host_calls_per_step if calls is None else calls,
        )
        # A tenant's own limits, when it has any, replace the fleet's for its runs.
        fuel = job.fuel_per_run or self.limits.fuel_per_run
        memory_cap = job.memory_bytes or self.limits.memory_bytes
        store.set_fuel(fuel)
        store.set_limits(memory_size=memory_cap, instances=1, tables=4, memories=1)
        memory: wasmtime.Memory | None = None

        def report(outcome: GuestOutcome) -> GuestReport:
            return GuestReport(outcome, tuple(run.recorded), run.logs)

        try:
            self._ticker.set_deadline(store, self.limits.run_timeout_ms)
            instance = pre.instantiate(store)
            exports = instance.exports(store)
            memory_export = exports["memory"]
            assert isinstance(memory_export, wasmtime.Memory)
            memory = memory_export
            initialize = exports.get("_initialize")
            if isinstance(initialize, wasmtime.Func):
                initialize(store)
            size = len(job.replay_buffer)
            pointer = _call(exports, store, "sf_alloc", size)
            if not isinstance(pointer, int) or pointer == 0:
                return report(GuestCrashed(f"sf_alloc({size}) returned no memory", "memory"))
            pointer = _check_range(memory, store, pointer, size, "replay buffer")
            memory.write(store, job.replay_buffer, pointer)
            _call(exports, store, "sf_run", pointer, size)
        except _Stop as stop:
            return report(stop.outcome)
        except _Violation as exc:
            return report(GuestCrashed(str(exc), exc.limit))
        except wasmtime.Trap as trap:
            crash = self._crashed(trap, memory, store, fuel=fuel, memory_cap=memory_cap)
            return report(self._in_step(run, crash))
        except wasmtime.WasmtimeError as exc:
            return report(GuestCrashed(f"guest error: {exc}"))
        except Exception as exc:
            # A host bug must cost this run only, never the worker's batch of other tenants.
            log.exception("guest_run_failed", digest=job.digest)
            return report(GuestCrashed(f"host error: {type(exc).__name__}"))
        finally:
            self._ticker.clear()
            run.store = None
            store.close()
        return report(GuestCrashed("guest returned without an outcome"))

    @staticmethod
    def _in_step(run: _RunState, crash: GuestCrashed) -> GuestOutcome:
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
                f"CPU limit exceeded: the step used all {fuel} units of fuel",
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
                f"and then trapped ({_first_line(trap)})",
                "memory",
            )
        return GuestCrashed(f"guest trapped: {_first_line(trap)}")

    # -- host imports --------------------------------------------------------------------

    def _define(
        self,
        module: str,
        name: str,
        signature: tuple[tuple[str, ...], tuple[str, ...]],
        func: Callable[..., Any],
    ) -> None:
        params, results = signature
        functype = wasmtime.FuncType(
            [_VALTYPES[p] for p in params], [_VALTYPES[r] for r in results]
        )
        where = f"{module}.{name}"

        def guarded(*args: Any) -> Any:
            try:
                return func(*args)
            except _Violation:
                raise
            except Exception as exc:
                # The checks below should leave nothing to reach here; if something does, it
                # fails this run, named, instead of escaping into the worker's batch.
                log.exception("host_import_failed", host_import=where)
                raise _Violation(f"host error in {where}: {type(exc).__name__}") from None

        self._linker.define_func(module, name, functype, guarded, access_caller=True)

    def _define_host_imports(self) -> None:
        limits = self.limits

        def name_at(
            caller: wasmtime.Caller,
            ptr: int,
            length: int,
            what: str = "step name",
            *,
            empty: bool = False,
        ) -> str:
            name = _text(caller, ptr, length, limits.name_bytes, what)
            if not name and not empty:
                raise _Violation(f"{what} is empty")
            # Names are keys and labels everywhere downstream; a NUL has no place in them.
            if "\x00" in name:
                raise _Violation(f"{what} contains a NUL character")
            return name

        def json_at(caller: wasmtime.Caller, ptr: int, length: int, what: str) -> str:
            text = _text(caller, ptr, length, limits.value_bytes, what)
            try:
                parse_guest_json(text)
            except JsonTooDeep as exc:
                raise _Violation(f"{what} is {exc}", "output") from None
            except ValueError as exc:
                raise _Violation(f"{what} is {exc}") from None
            return text

        def message_at(caller: wasmtime.Caller, ptr: int, length: int) -> str:
            return _no_nul(_text(caller, ptr, length, limits.value_bytes, "error message"))

        def begun(seq: int, name: str) -> _Step:
            step = self._run.step
            if step is None or step.seq != seq or step.name != name:
                raise _Violation(
                    f"guest ABI violation: step {name!r} at position {seq} reported "
                    "without step_begin"
                )
            return step

        def outside_step(what: str) -> None:
            if self._run.step is not None:
                raise _Violation(f"guest ABI violation: {what} called inside a step")

        def step_begin(
            caller: wasmtime.Caller, seq: int, np: int, nl: int, cp: int, cl: int
        ) -> int:
            run = self._run
            name = name_at(caller, np, nl)
            if run.step is not None:
                raise _Violation(f"guest ABI violation: step {name!r} begun inside a step")
            if seq != run.next_seq:
                raise _Violation(
                    f"guest ABI violation: step {name!r} begun at position {seq}, "
                    f"the next position is {run.next_seq}"
                )
            text = _text(caller, cp, cl, limits.value_bytes, "step config") if cl else ""
            try:
                config = parse_step_config(text, max_ms=limits.max_sleep_ms)
            except ValueError as exc:
                raise _Violation(f"step {name!r} config: {exc}") from None
            run.step = _Step(seq, name, config)
            assert run.store is not None
            self._ticker.set_deadline(run.store, config.timeout_ms)
            return run.attempt

        def step_done(
            caller: wasmtime.Caller, seq: int, np: int, nl: int, rp: int, rl: int, flags: int
        ) -> NoReturn:
            step = begun(seq, name_at(caller, np, nl))
            flags = _u32(flags)
            if flags & ~int(_KNOWN_FLAGS):  # an IntFlag's own ~ would drop the unknown bits
                raise _Violation(f"guest ABI violation: unknown step_done flags {flags:#x}")
            result = json_at(caller, rp, rl, "step result")
            raise _Stop(
                StepSucceeded(seq, step.name, result, EntryFlags(flags), config=step.config)
            )

        def step_failed(
            caller: wasmtime.Caller, seq: int, np: int, nl: int, mp: int, ml: int, flags: int
        ) -> NoReturn:
            step = begun(seq, name_at(caller, np, nl))
            message = message_at(caller, mp, ml)
            raise _Stop(StepFailed(seq, step.name, message, bool(flags & 1), config=step.config))

        def sleep(
            caller: wasmtime.Caller, seq: int, np: int, nl: int, ms: int, flags: int
        ) -> NoReturn:
            outside_step("sleep")
            name = name_at(caller, np, nl, "sleep name")
            absolute = bool(flags & 1)
            if not -_MAX_SLEEP_VALUE_MS <= ms <= _MAX_SLEEP_VALUE_MS:
                what = f"until {ms}" if absolute else f"of {ms} ms"
                raise _Violation(
                    f"sleep {name!r} {what} is out of range "
                    f"(-{_MAX_SLEEP_VALUE_MS} to {_MAX_SLEEP_VALUE_MS} ms)"
                )
            raise _Stop(SleepRequested(seq, name, ms, absolute=absolute))

        def wait_event(
            caller: wasmtime.Caller, seq: int, np: int, nl: int, tp: int, tl: int, timeout: int
        ) -> NoReturn:
            outside_step("wait_event")
            name = name_at(caller, np, nl, "wait name")
            event_type = name_at(caller, tp, tl, "event type")
            raise _Stop(EventAwaited(seq, name, event_type, None if timeout < 0 else timeout))

        def now(caller: wasmtime.Caller, seq: int) -> int:
            value = int(self._clock() * 1000)
            if self._run.step is None:
                self._run.record(seq, EntryKind.NOW, str(value))
            return value

        def random(caller: wasmtime.Caller, seq: int, ptr: int, length: int) -> None:
            length = _u32(length)
            if not 1 <= length <= _MAX_RANDOM_BYTES:
                raise _Violation(f"random asks for {length} bytes, allowed 1 to 256")
            memory = _memory(caller)
            ptr = _check_range(memory, caller, ptr, length, "random buffer")
            data = secrets.token_bytes(length)
            if self._run.step is None:
                self._run.record(seq, EntryKind.RANDOM, data.hex())
            memory.write(caller, data, ptr)

        def complete(caller: wasmtime.Caller, seq: int, op: int, ol: int) -> NoReturn:
            outside_step("complete")
            raise _Stop(Completed(seq, json_at(caller, op, ol, "workflow output")))

        def fail(caller: wasmtime.Caller, seq: int, mp: int, ml: int) -> NoReturn:
            outside_step("fail")
            raise _Stop(WorkflowFailed(seq, message_at(caller, mp, ml)))

        def nondeterminism(
            caller: wasmtime.Caller, seq: int, op: int, np: int, nl: int
        ) -> NoReturn:
            # Empty for `now` and `random`, which have no name.
            name = name_at(caller, np, nl, "nondeterminism name", empty=True)
            raise _Stop(Nondeterministic(seq, name, op))

        def log_line(caller: wasmtime.Caller, level: int, mp: int, ml: int) -> None:
            memory = _memory(caller)
            mp = _check_range(memory, caller, mp, ml, "log line")
            logs = self._run.logs
            if len(logs) >= limits.log_lines_per_run:
                return
            length = min(_u32(ml), limits.log_line_bytes)
            raw = bytes(memory.read(caller, mp, mp + length)) if length else b""
            logs.append((min(max(level, 0), 3), _log_text(raw)))

        def in_step(what: str) -> _Step:
            step = self._run.step
            if step is None:
                raise _Violation(
                    f"guest ABI violation: {what} called outside a step "
                    "(HTTP calls are only allowed inside a step function)"
                )
            return step

        def http_request(caller: wasmtime.Caller, rp: int, rl: int) -> int:
            step = in_step("http_request")
            text = _text(caller, rp, rl, limits.value_bytes, "http request")
            try:
                parse_guest_json(text)  # the host's bounds first: nesting, RFC 8259
            except ValueError as exc:
                raise _Violation(f"guest ABI violation: http request is {exc}") from None
            try:
                request = HttpRequest.from_json(text)
            except ValueError as exc:
                raise _Violation(f"guest ABI violation: http request {exc}") from None
            step.http_calls += 1
            answer = self._http_call(self._run, step, request).to_json().encode()
            step.http_response = answer
            return len(answer)

        def http_response(caller: wasmtime.Caller, ptr: int, length: int) -> None:
            step = in_step("http_response")
            answer = step.http_response
            if answer is None:
                raise _Violation("guest ABI violation: http_response without an http_request")
            length = _u32(length)
            if length != len(answer):
                raise _Violation(
                    f"guest ABI violation: http_response asked for {length} bytes, "
                    f"the answer is {len(answer)}"
                )
            memory = _memory(caller)
            ptr = _check_range(memory, caller, ptr, length, "http response buffer")
            memory.write(caller, answer, ptr)
            step.http_response = None

        handlers: dict[str, Callable[..., Any]] = {
            "step_begin": step_begin,
            "step_done": step_done,
            "step_failed": step_failed,
            "sleep": sleep,
            "wait_event": wait_event,
            "now": now,
            "random": random,
            "complete": complete,
            "fail": fail,
            "nondeterminism": nondeterminism,
            "log": log_line,
            "http_request": http_request,
            "http_response": http_response,
        }
        for name, signature in HOST_IMPORTS.items():
            self._define(HOST_MODULE, name, signature, handlers[name])

    def _http_call(self, run: _RunState, step: _Step, request: HttpRequest) -> HttpResponse:
        """One guest HTTP call through the egress gateway, within the step's cap and time."""
        cap = run.host_calls_per_step
        if step.http_calls > cap:
            return HttpResponse.failed(
                f"host call limit reached: a step may make {cap} HTTP call(s)"
            )
        if self._egress is None:
            return HttpResponse.failed("egress is not configured")
        left = step.deadline - time.monotonic()
        if left <= 0:
            return HttpResponse.failed(f"step {step.name!r} has no time left for an HTTP call")
        try:
            return self._egress.request(run.tenant, request, min(self._egress.call_timeout_s, left))
        except Exception as exc:  # a gateway bug must not fail the worker; say nothing more
            return HttpResponse.failed(f"egress gateway error ({type(exc).__name__})")

    def _define_wasi_imports(self) -> None:
        limits = self.limits

        def fd_write(caller: wasmtime.Caller, fd: int, iovs: int, count: int, written: int) -> int:
            if fd not in (1, 2):
                return _EBADF
            memory = _memory(caller)
            # At most 64 iovs per call; wasi-libc writes the rest in the next call.
            count = min(_u32(count), _MAX_FD_WRITE_IOVS)
            iovs = _check_range(memory, caller, iovs, 8 * count, "fd_write iovs")
            written = _check_range(memory, caller, written, 4, "fd_write result")
            table = bytes(memory.read(caller, iovs, iovs + 8 * count))
            total = 0
            line = bytearray()
            for index in range(count):
                base = int.from_bytes(table[8 * index : 8 * index + 4], "little")
                length = int.from_bytes(table[8 * index + 4 : 8 * index + 8], "little")
                _check_range(memory, caller, base, length, f"fd_write iov {index}")
                take = min(length, limits.log_line_bytes - len(line))
                if take > 0:
                    line += memory.read(caller, base, base + take)
                total += length
            if total >= _ADDRESS_SPACE:
                return _EINVAL  # as writev: the count written would not fit its u32
            if len(self._run.logs) < limits.log_lines_per_run:
                self._run.logs.append((1 if fd == 1 else 3, _log_text(bytes(line)).rstrip("\n")))
            memory.write(caller, total.to_bytes(4, "little"), written)
            return 0

        def empty_sizes(what: str) -> Callable[[wasmtime.Caller, int, int], int]:
            def sizes(caller: wasmtime.Caller, count_ptr: int, size_ptr: int) -> int:
                memory = _memory(caller)
                count_ptr = _check_range(memory, caller, count_ptr, 4, what)
                size_ptr = _check_range(memory, caller, size_ptr, 4, what)
                memory.write(caller, bytes(4), count_ptr)
                memory.write(caller, bytes(4), size_ptr)
                return 0

            return sizes

        def proc_exit(caller: wasmtime.Caller, code: int) -> NoReturn:
            raise _Violation(f"guest called proc_exit({code})")

        # The other shims touch no memory, so their pointers need no check.
        handlers: dict[str, Callable[..., Any]] = {
            "fd_write": fd_write,
            "fd_close": lambda caller, fd: _EBADF,
            "fd_seek": lambda caller, fd, offset, whence, result: _EBADF,
            "fd_fdstat_get": lambda caller, fd, result: _EBADF,
            "environ_sizes_get": empty_sizes("environ_sizes_get"),
            "environ_get": lambda caller, a, b: 0,
            "args_sizes_get": empty_sizes("args_sizes_get"),
            "args_get": lambda caller, a, b: 0,
            "proc_exit": proc_exit,
        }
        for name, signature in WASI_IMPORTS.items():
            self._define(WASI_MODULE, name, signature, handlers[name])


def _call(exports: Any, store: wasmtime.Store, name: str, *args: int) -> Any:
    func = exports[name]
    assert isinstance(func, wasmtime.Func)
    return func(store, *args)


def _memory(caller: wasmtime.Caller) -> wasmtime.Memory:
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        raise _Violation("the module exports no memory")
    return memory


def _u32(value: int) -> int:
    """An i32 argument as the unsigned number the guest means (wasmtime hands them signed)."""
    return value & 0xFFFF_FFFF


def _check_range(memory: wasmtime.Memory, store: Any, ptr: int, length: int, what: str) -> int:
    """Check that `length` bytes at `ptr` lie in guest memory; return `ptr` as unsigned."""
    ptr, length = _u32(ptr), _u32(length)
    size = min(memory.data_len(store), _ADDRESS_SPACE)
    if ptr + length > size:
        raise _Violation(
            f"{what}: pointer range {ptr}+{length} is outside guest memory ({size} bytes)"
        )
    return ptr


def _text(caller: wasmtime.Caller, ptr: int, length: int, limit: int, what: str) -> str:
    length = _u32(length)
    if length > limit:
        raise _Violation(f"{what} is {length} bytes, the limit is {limit}", "output")
    memory = _memory(caller)
    ptr = _check_range(memory, caller, ptr, length, what)
    try:
        return bytes(memory.read(caller, ptr, ptr + length)).decode()
    except UnicodeDecodeError:
        raise _Violation(f"{what} is not UTF-8") from None


def _no_nul(text: str) -> str:
    """Free text (messages, log lines) keeps its content; a NUL, which text columns and
    terminals cannot carry, becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


def _log_text(raw: bytes) -> str:
    """A log line as text: bytes that are not UTF-8, and NULs, become U+FFFD."""
    return _no_nul(raw.decode(errors="replace"))


def _first_line(exc: BaseException) -> str:
    """The line of a wasmtime error that says what happened (a trap's cause, not its backtrace)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("wasm trap:"):
            return line.removeprefix("wasm trap:").strip()
    return lines[0] if lines else type(exc).__name__


def _signature(functype: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(t) for t in functype.params), tuple(str(t) for t in functype.results)


def _check_imports(module: wasmtime.Module) -> None:
    for imported in module.imports:
        where = f"{imported.module}.{imported.name}"
        allowed = ALLOWED_IMPORTS.get(imported.module, {})
        expected = allowed.get(imported.name or "")
        if expected is None:
            raise InvalidModule(
                f"module imports {where}, which the guest ABI does not grant "
                f"(allowed: the stepfleet imports and an inert WASI subset, see docs/guest-abi.md)"
            )
        if (
            not isinstance(imported.type, wasmtime.FuncType)
            or _signature(imported.type) != expected
        ):
            raise InvalidModule(f"module imports {where} with the wrong type")


def _check_exports(module: wasmtime.Module) -> None:
    exports = {export.name: export.type for export in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise InvalidModule("module does not export its memory as 'memory'")
    for name, expected in REQUIRED_EXPORTS.items():
        functype = exports.get(name)
        if not isinstance(functype, wasmtime.FuncType):
            raise InvalidModule(
                f"module does not export {name}: build it with a stepfleet guest SDK "
                f"(guest ABI v{ABI_VERSION})"
            )
        if _signature(functype) != expected:
            raise InvalidModule(f"module exports {name} with the wrong type")
