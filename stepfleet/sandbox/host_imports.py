"""The `stepfleet` host imports of the guest ABI (docs/guest-abi.md), one method each."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import NoReturn

import wasmtime

from stepfleet.sandbox.abi import HOST_IMPORTS, HOST_MODULE
from stepfleet.sandbox.epoch import EpochTicker
from stepfleet.sandbox.guest_json import JsonTooDeep, parse_guest_json
from stepfleet.sandbox.guest_memory import (
    check_range,
    exported_memory,
    log_text,
    no_nul,
    read_text,
    u32,
)
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.linking import Stop, Violation, define_imports
from stepfleet.sandbox.run_state import RunState, Step
from stepfleet.sandbox.step_config import parse_step_config
from stepfleet.schemas import (
    AnsweredCall,
    CallRequested,
    Completed,
    EntryFlags,
    EntryKind,
    EventAwaited,
    HttpRequest,
    HttpResponse,
    Nondeterministic,
    SleepRequested,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
)

_MAX_RANDOM_BYTES = 256
_MAX_SLEEP_VALUE_MS = 10**13
"""Largest sleep duration or Unix time, of either sign (ms, about 317 years): beyond it date
arithmetic can overflow. The sleep limit itself (365 days) is the engine's to apply."""
_KNOWN_FLAGS = EntryFlags.HAS_ROLLBACK | EntryFlags.SENSITIVE | EntryFlags.COMPENSATION


class HostImports:
    """The `stepfleet` imports, acting on the run under way (`current_run()`).

    The terminal imports (a step's result, sleep, wait, complete, fail, nondeterminism) never
    return: they raise `Stop` with the run's outcome.
    """

    def __init__(
        self,
        limits: SandboxLimits,
        current_run: Callable[[], RunState],
        ticker: EpochTicker,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._limits = limits
        self._current_run = current_run
        self._ticker = ticker
        self._clock = clock

    def define(self, linker: wasmtime.Linker) -> None:
        define_imports(linker, HOST_MODULE, HOST_IMPORTS, self)

    def _memory(self) -> wasmtime.Memory | None:
        """The run's memory, when the run has it (see exported_memory)."""
        return self._current_run().memory

    # -- steps ---------------------------------------------------------------------------

    def step_begin(
        self, caller: wasmtime.Caller, seq: int, np: int, nl: int, cp: int, cl: int
    ) -> int:
        run = self._current_run()
        name = self._name_at(caller, np, nl)
        if run.step is not None:
            raise Violation(f"guest ABI violation: step {name!r} begun inside a step")
        if seq != run.next_seq:
            raise Violation(
                f"guest ABI violation: step {name!r} begun at position {seq}, "
                f"the next position is {run.next_seq}"
            )
        text = (
            read_text(caller, cp, cl, self._limits.value_bytes, "step config", self._memory())
            if cl
            else ""
        )
        try:
            config = parse_step_config(text, max_ms=self._limits.max_sleep_ms)
        except ValueError as exc:
            raise Violation(
                f"step {name!r} config: {exc}", where=f"step {name!r} attempt {run.attempt} failed"
            ) from None
        run.step = step = Step(seq, name, config, run.step_deadline)
        assert run.store is not None
        left_ms = int((step.deadline - time.monotonic()) * 1000)
        if left_ms <= 0:  # a resumed attempt whose call took the rest of the step's time
            raise Stop(
                StepFailed(
                    seq,
                    name,
                    f"step {name!r} timed out after {config.timeout_ms} ms",
                    config=config,
                    limit="timeout",
                )
            )
        self._ticker.set_deadline(run.store, min(left_ms, config.timeout_ms))
        return run.attempt

    def step_done(
        self, caller: wasmtime.Caller, seq: int, np: int, nl: int, rp: int, rl: int, flags: int
    ) -> NoReturn:
        step = self._begun(seq, self._name_at(caller, np, nl))
        flags = u32(flags)
        if flags & ~int(_KNOWN_FLAGS):  # an IntFlag's own ~ would drop the unknown bits
            raise Violation(f"guest ABI violation: unknown step_done flags {flags:#x}")
        result = self._json_at(caller, rp, rl, "step result")
        raise Stop(StepSucceeded(seq, step.name, result, EntryFlags(flags), config=step.config))

    def step_failed(
        self, caller: wasmtime.Caller, seq: int, np: int, nl: int, mp: int, ml: int, flags: int
    ) -> NoReturn:
        step = self._begun(seq, self._name_at(caller, np, nl))
        message = self._message_at(caller, mp, ml)
        raise Stop(StepFailed(seq, step.name, message, bool(flags & 1), config=step.config))

    # -- between steps -------------------------------------------------------------------

    def sleep(
        self, caller: wasmtime.Caller, seq: int, np: int, nl: int, ms: int, flags: int
    ) -> NoReturn:
        self._outside_step("sleep")
        name = self._name_at(caller, np, nl, "sleep name")
        absolute = bool(flags & 1)
        if not -_MAX_SLEEP_VALUE_MS <= ms <= _MAX_SLEEP_VALUE_MS:
            what = f"until {ms}" if absolute else f"of {ms} ms"
            raise Violation(
                f"sleep {name!r} {what} is out of range "
                f"(-{_MAX_SLEEP_VALUE_MS} to {_MAX_SLEEP_VALUE_MS} ms)"
            )
        raise Stop(SleepRequested(seq, name, ms, absolute=absolute))

    def wait_event(
        self, caller: wasmtime.Caller, seq: int, np: int, nl: int, tp: int, tl: int, timeout: int
    ) -> NoReturn:
        self._outside_step("wait_event")
        name = self._name_at(caller, np, nl, "wait name")
        event_type = self._name_at(caller, tp, tl, "event type")
        raise Stop(EventAwaited(seq, name, event_type, None if timeout < 0 else timeout))

    def complete(self, caller: wasmtime.Caller, seq: int, op: int, ol: int) -> NoReturn:
        self._outside_step("complete")
        try:
            output = self._json_at(caller, op, ol, "workflow output")
        except Violation as exc:
            raise Violation(
                str(exc), exc.limit, where="the workflow's return value was refused"
            ) from None
        raise Stop(Completed(seq, output))

    def fail(self, caller: wasmtime.Caller, seq: int, mp: int, ml: int) -> NoReturn:
        self._outside_step("fail")
        raise Stop(WorkflowFailed(seq, self._message_at(caller, mp, ml)))

    def nondeterminism(
        self, caller: wasmtime.Caller, seq: int, op: int, np: int, nl: int
    ) -> NoReturn:
        # Empty for `now` and `random`, which have no name.
        name = self._name_at(caller, np, nl, "nondeterminism name", empty=True)
        raise Stop(Nondeterministic(seq, name, op))

    # -- anywhere ------------------------------------------------------------------------

    def now(self, caller: wasmtime.Caller, seq: int) -> int:
        value = int(self._clock() * 1000)
        run = self._current_run()
        if run.step is None:
            run.record(seq, EntryKind.NOW, str(value))
        return value

    def random(self, caller: wasmtime.Caller, seq: int, ptr: int, length: int) -> None:
        length = u32(length)
        if not 1 <= length <= _MAX_RANDOM_BYTES:
            raise Violation(f"random asks for {length} bytes, allowed 1 to 256")
        memory = exported_memory(caller, self._memory())
        ptr = check_range(memory, caller, ptr, length, "random buffer")
        data = secrets.token_bytes(length)
        run = self._current_run()
        if run.step is None:
            run.record(seq, EntryKind.RANDOM, data.hex())
        memory.write(caller, data, ptr)

    def log(self, caller: wasmtime.Caller, level: int, mp: int, ml: int) -> None:
        memory = exported_memory(caller, self._memory())
        mp = check_range(memory, caller, mp, ml, "log line")
        logs = self._current_run().logs
        if len(logs) >= self._limits.log_lines_per_run:
            return
        length = min(u32(ml), self._limits.log_line_bytes)
        raw = bytes(memory.read(caller, mp, mp + length)) if length else b""
        logs.append((min(max(level, 0), 3), log_text(raw)))

    # -- HTTP, inside a step -------------------------------------------------------------

    def http_request(self, caller: wasmtime.Caller, rp: int, rl: int) -> int:
        step = self._in_step("http_request")
        text = read_text(caller, rp, rl, self._limits.value_bytes, "http request", self._memory())
        try:
            parse_guest_json(text)  # the host's bounds first: nesting, RFC 8259
        except ValueError as exc:
            raise Violation(f"guest ABI violation: http request is {exc}") from None
        try:
            request = HttpRequest.from_json(text)
        except ValueError as exc:
            raise Violation(f"guest ABI violation: http request {exc}") from None
        run = self._current_run()
        index = step.http_calls
        step.http_calls += 1
        made = run.answers[index] if index < len(run.answers) else None
        if made is not None and made.request == request:  # a resumed attempt: made already
            answer = made.response
        else:  # a new call, or one the step now asks differently: (made) again
            answer = self._refusal(run, step) or self._stop_at_call(run, step, request)
        run.answered.append(AnsweredCall(request, answer))
        step.http_response = answer.to_json().encode()
        return len(step.http_response)

    def http_response(self, caller: wasmtime.Caller, ptr: int, length: int) -> None:
        step = self._in_step("http_response")
        answer = step.http_response
        if answer is None:
            raise Violation("guest ABI violation: http_response without an http_request")
        length = u32(length)
        if length != len(answer):
            raise Violation(
                f"guest ABI violation: http_response asked for {length} bytes, "
                f"the answer is {len(answer)}"
            )
        memory = exported_memory(caller, self._memory())
        ptr = check_range(memory, caller, ptr, length, "http response buffer")
        memory.write(caller, answer, ptr)
        step.http_response = None

    @staticmethod
    def _refusal(run: RunState, step: Step) -> HttpResponse | None:
        """The answer of a call that is not made: over the step's cap, or out of time."""
        cap = run.host_calls_per_step
        if step.http_calls > cap:
            return HttpResponse.failed(
                f"host call limit reached: a step may make {cap} HTTP call(s)"
            )
        if step.deadline - time.monotonic() <= 0:
            return HttpResponse.failed(f"step {step.name!r} has no time left for an HTTP call")
        return None

    @staticmethod
    def _stop_at_call(run: RunState, step: Step, request: HttpRequest) -> NoReturn:
        """End the run at the call: the host makes it off this thread and runs the guest
        again with its answer (the sandbox does no network I/O)."""
        raise Stop(CallRequested(step.seq, step.name, request, tuple(run.answered), step.deadline))

    # -- reading the guest's arguments, checking where it stands -------------------------

    def _name_at(
        self,
        caller: wasmtime.Caller,
        ptr: int,
        length: int,
        what: str = "step name",
        *,
        empty: bool = False,
    ) -> str:
        name = read_text(caller, ptr, length, self._limits.name_bytes, what, self._memory())
        if not name and not empty:
            raise Violation(f"{what} is empty")
        # Names are keys and labels everywhere downstream; a NUL has no place in them.
        if "\x00" in name:
            raise Violation(f"{what} contains a NUL character")
        return name

    def _json_at(self, caller: wasmtime.Caller, ptr: int, length: int, what: str) -> str:
        text = read_text(caller, ptr, length, self._limits.value_bytes, what, self._memory())
        try:
            parse_guest_json(text)
        except JsonTooDeep as exc:
            raise Violation(f"{what} is {exc}", "output") from None
        except ValueError as exc:
            raise Violation(f"{what} is {exc}") from None
        return text

    def _message_at(self, caller: wasmtime.Caller, ptr: int, length: int) -> str:
        return no_nul(
            read_text(
                caller, ptr, length, self._limits.value_bytes, "error message", self._memory()
            )
        )

    def _begun(self, seq: int, name: str) -> Step:
        step = self._current_run().step
        if step is None or step.seq != seq or step.name != name:
            raise Violation(
                f"guest ABI violation: step {name!r} at position {seq} reported without step_begin"
            )
        return step

    def _outside_step(self, what: str) -> None:
        if self._current_run().step is not None:
            raise Violation(f"guest ABI violation: {what} called inside a step")

    def _in_step(self, what: str) -> Step:
        step = self._current_run().step
        if step is None:
            raise Violation(
                f"guest ABI violation: {what} called outside a step "
                "(HTTP calls are only allowed inside a step function)"
            )
        return step
