"""Hostile guests against the host imports: every bad pointer, length, value and timeout ends as
a documented outcome (docs/guest-abi.md, *What the host checks*), never a Python exception."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import wasmtime

from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import (
    GuestRun,
    ReplayJournal,
    SandboxLimits,
    WasmSandbox,
    encode_replay_buffer,
)
from stepfleet.sandbox.abi import HOST_IMPORTS, HOST_MODULE, WASI_IMPORTS, WASI_MODULE
from stepfleet.schemas import (
    AnsweredCall,
    Completed,
    GuestCrashed,
    GuestReport,
    HttpRequest,
    HttpResponse,
    InstanceKey,
    InstanceStatus,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
    digest_of,
)
from tests.conftest import ORDER_OUTPUT, ORDER_PARAMS, capture_logs

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALLOC = 1024
"""Where every test guest's sf_alloc puts the replay buffer; data goes below it or far above."""


def _functype(signature: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    params, results = signature
    return " ".join(
        part
        for part in (
            f"(param {' '.join(params)})" if params else "",
            f"(result {' '.join(results)})" if results else "",
        )
        if part
    )


IMPORTS = "\n".join(
    f'(import "{module}" "{name}" (func ${name} {_functype(signature)}))'
    for module, table in ((HOST_MODULE, HOST_IMPORTS), (WASI_MODULE, WASI_IMPORTS))
    for name, signature in table.items()
)
"""Every import the ABI grants, callable as $name."""


def wat_string(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return "".join(f"\\{byte:02x}" for byte in raw)


def guest(
    body: str, *, data: dict[int, bytes | str] | None = None, pages: int = 1, funcs: str = ""
) -> bytes:
    """A module whose sf_run is `body`, with `data` placed at the given addresses."""
    segments = "\n".join(
        f'(data (i32.const {at}) "{wat_string(value)}")' for at, value in (data or {}).items()
    )
    return wasmtime.wat2wasm(
        f"""(module
          {IMPORTS}
          (memory (export "memory") {pages})
          {segments}
          {funcs}
          (func (export "sf_abi_version") (result i32) (i32.const 2))
          (func (export "sf_alloc") (param i32) (result i32) (i32.const {ALLOC}))
          (func (export "sf_run") (param $ptr i32) (param $len i32) {body}))"""
    )


NO_EGRESS = HttpResponse.failed("egress is not configured")


def run_guest(sandbox: WasmSandbox, wasm: bytes, params: str = "{}") -> GuestReport:
    digest = digest_of(wasm)
    if not sandbox.is_loaded(digest):
        sandbox.load(digest, wasm)
    # A call is answered as a worker without egress would: the run goes on past it.
    answers = (AnsweredCall(HttpRequest.from_json(REQUEST), NO_EGRESS),)
    buffer = encode_replay_buffer("i-1", params, ReplayJournal())
    return sandbox.run(GuestRun(digest, buffer, answers=answers))


def crash_message(report: GuestReport) -> str:
    assert isinstance(report.outcome, GuestCrashed), report.outcome
    return report.outcome.message


def begin(name_at: int = 16, name_len: int = 4, config_at: int = 0, config_len: int = 0) -> str:
    return (
        f"(drop (call $step_begin (i32.const 0) (i32.const {name_at}) (i32.const {name_len}) "
        f"(i32.const {config_at}) (i32.const {config_len})))"
    )


@pytest.fixture(scope="module")
def sandbox():
    sandbox = WasmSandbox(SandboxLimits(fuel_per_run=50_000_000, memory_bytes=8 * 1024 * 1024))
    yield sandbox
    sandbox.close()


# -- pointers and lengths ------------------------------------------------------------------

STEP = {16: "step"}
TWO_HUGE_IOVS = {16: "step", 128: (0).to_bytes(4, "little") + (0xFFFFFFFF).to_bytes(4, "little")}
TWO_HUGE_IOVS[136] = TWO_HUGE_IOVS[128]
ONE_IOV = {16: "step", 128: (16).to_bytes(4, "little") + (4).to_bytes(4, "little")}
REQUEST = '{"method":"GET","url":"https://example.org/"}'


@pytest.mark.parametrize(
    ("body", "data", "message"),
    [
        pytest.param(
            "(drop (call $environ_sizes_get (i32.const -2) (i32.const 0)))",
            {},
            "environ_sizes_get: pointer range 4294967294+4 is outside guest memory",
            id="environ_sizes_get-near-4GiB",
        ),
        pytest.param(
            "(drop (call $args_sizes_get (i32.const 0) (i32.const -4)))",
            {},
            "args_sizes_get: pointer range 4294967292+4 is outside guest memory",
            id="args_sizes_get-negative",
        ),
        pytest.param(
            "(drop (call $environ_sizes_get (i32.const 65534) (i32.const 0)))",
            {},
            "environ_sizes_get: pointer range 65534+4 is outside guest memory",
            id="environ_sizes_get-straddles-the-end",
        ),
        pytest.param(
            "(drop (call $fd_write (i32.const 1) (i32.const -8) (i32.const 1) (i32.const 64)))",
            {},
            "fd_write iovs: pointer range 4294967288+8 is outside guest memory",
            id="fd_write-iovs-near-4GiB",
        ),
        pytest.param(
            "(drop (call $fd_write (i32.const 1) (i32.const 128) (i32.const 2) (i32.const 64)))",
            TWO_HUGE_IOVS,
            "fd_write iov 0: pointer range 0+4294967295 is outside guest memory",
            id="fd_write-iov-lengths-past-2**32",
        ),
        pytest.param(
            "(drop (call $fd_write (i32.const 1) (i32.const 128) (i32.const 1) (i32.const -1)))",
            ONE_IOV,
            "fd_write result: pointer range 4294967295+4 is outside guest memory",
            id="fd_write-result-near-4GiB",
        ),
        pytest.param(
            "(call $log (i32.const 1) (i32.const -16) (i32.const 8))",
            {},
            "log line: pointer range 4294967280+8 is outside guest memory",
            id="log-near-4GiB",
        ),
        pytest.param(
            "(call $log (i32.const 1) (i32.const 16) (i32.const -1))",
            {},
            "log line: pointer range 16+4294967295 is outside guest memory",
            id="log-length-near-4GiB",
        ),
        pytest.param(
            "(call $random (i32.const 0) (i32.const -4) (i32.const 8))",
            {},
            "random buffer: pointer range 4294967292+8 is outside guest memory",
            id="random-near-4GiB",
        ),
        pytest.param(
            "(call $random (i32.const 0) (i32.const 16) (i32.const -1))",
            {},
            "random asks for 4294967295 bytes, allowed 1 to 256",
            id="random-length-negative",
        ),
        pytest.param(
            begin(name_at=-1),
            {},
            "step name: pointer range 4294967295+4 is outside guest memory",
            id="step_begin-name-near-4GiB",
        ),
        pytest.param(
            begin(name_len=-1),
            STEP,
            "step name is 4294967295 bytes, the limit is 256",
            id="step_begin-name-length-negative",
        ),
        pytest.param(
            begin(config_at=-100, config_len=200),
            STEP,
            "step config: pointer range 4294967196+200 is outside guest memory",
            id="step_begin-config-wraps-past-2**32",
        ),
        pytest.param(
            begin()
            + "(call $step_done (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 65530)"
            " (i32.const 16) (i32.const 0))",
            STEP,
            "step result: pointer range 65530+16 is outside guest memory",
            id="step_done-result-past-the-end",
        ),
        pytest.param(
            "(call $complete (i32.const 0) (i32.const 16) (i32.const -1))",
            {},
            "workflow output is 4294967295 bytes, the limit is 1048576",
            id="complete-length-negative",
        ),
        pytest.param(
            "(call $fail (i32.const 0) (i32.const -2) (i32.const 4))",
            {},
            "error message: pointer range 4294967294+4 is outside guest memory",
            id="fail-message-wraps",
        ),
        pytest.param(
            begin()
            + "(call $step_failed (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 1000)"
            " (i32.const 1048576) (i32.const 0))",
            STEP,
            "error message: pointer range 1000+1048576 is outside guest memory",
            id="step_failed-message-past-the-end",
        ),
        pytest.param(
            "(call $sleep (i32.const 0) (i32.const -1) (i32.const 4) (i64.const 5) (i32.const 0))",
            {},
            "sleep name: pointer range 4294967295+4 is outside guest memory",
            id="sleep-name-near-4GiB",
        ),
        pytest.param(
            "(call $wait_event (i32.const 0) (i32.const 16) (i32.const 4) (i32.const -1)"
            " (i32.const 2) (i64.const -1))",
            STEP,
            "event type: pointer range 4294967295+2 is outside guest memory",
            id="wait_event-type-near-4GiB",
        ),
        pytest.param(
            "(call $nondeterminism (i32.const 0) (i32.const 1) (i32.const -3) (i32.const 4))",
            {},
            "nondeterminism name: pointer range 4294967293+4 is outside guest memory",
            id="nondeterminism-name-wraps",
        ),
        pytest.param(
            begin() + f"(call $http_response (i32.const -16) (call $http_request (i32.const 256)"
            f" (i32.const {len(REQUEST)})))",
            {16: "step", 256: REQUEST},
            "http response buffer: pointer range 4294967280+",
            id="http_response-near-4GiB",
        ),
        pytest.param(
            begin() + "(call $http_response (i32.const 16) (i32.const -1))",
            STEP,
            "guest ABI violation: http_response without an http_request",
            id="http_response-without-request",
        ),
    ],
)
def test_hostile_pointers_and_lengths_fail_the_run_naming_the_range(sandbox, body, data, message):
    """Pointers and lengths are unsigned 32-bit: a range past the memory, or past 4 GiB, is
    refused with a message that names the argument and the range, as the guest meant it."""
    report = run_guest(sandbox, guest(body, data=data))
    assert message in crash_message(report)


def test_fd_write_lengths_summing_past_4_gib_get_einval():
    """Iovs that each lie in (a 2 GiB) memory but sum past what a u32 can report get EINVAL."""
    half = 32769  # pages: a little over 2 GiB, so that two whole-memory iovs sum past 2**32
    size = (half * 65536).to_bytes(4, "little")
    iov = (0).to_bytes(4, "little") + size
    big = WasmSandbox(SandboxLimits(memory_bytes=3 * 1024**3))
    try:
        report = run_guest(
            big,
            guest(
                "(if (i32.eq (call $fd_write (i32.const 1) (i32.const 128) (i32.const 2)"
                " (i32.const 64)) (i32.const 28))"
                " (then (call $complete (i32.const 0) (i32.const 16) (i32.const 4))))"
                " unreachable",
                data={16: "true", 128: iov + iov},
                pages=half,
            ),
        )
    finally:
        big.close()
    assert report.outcome == Completed(0, "true")
    assert report.logs == []


# -- JSON ----------------------------------------------------------------------------------

DEEP = "[" * 200_000
BIG = 8192
"""Where the tests put large data: above the replay buffer."""


@pytest.mark.parametrize(
    ("body", "data", "message"),
    [
        pytest.param(
            begin()
            + f"(call $step_done (i32.const 0) (i32.const 16) (i32.const 4) (i32.const {BIG})"
            f" (i32.const {len(DEEP)}) (i32.const 0))",
            {16: "step", BIG: DEEP},
            "step result is nested deeper than 256 levels",
            id="step-result",
        ),
        pytest.param(
            f"(call $complete (i32.const 0) (i32.const {BIG}) (i32.const {len(DEEP)}))",
            {BIG: DEEP},
            "workflow output is nested deeper than 256 levels",
            id="workflow-output",
        ),
        pytest.param(
            begin(config_at=BIG, config_len=len(DEEP)),
            {16: "step", BIG: DEEP},
            "step 'step' config: nested deeper than 256 levels",
            id="step-config",
        ),
        pytest.param(
            begin() + f"(drop (call $http_request (i32.const {BIG}) (i32.const {len(DEEP)})))",
            {16: "step", BIG: DEEP},
            "guest ABI violation: http request is nested deeper than 256 levels",
            id="http-request",
        ),
    ],
)
def test_json_nested_past_the_limit_is_refused(sandbox, body, data, message):
    """JSON nested 200,000 deep fails the run with the nesting limit, not a RecursionError."""
    report = run_guest(sandbox, guest(body, data=data, pages=4))
    assert crash_message(report) == message


def complete_with(output: str) -> bytes:
    return guest(
        f"(call $complete (i32.const 0) (i32.const {BIG}) (i32.const {len(output.encode())}))",
        data={BIG: output},
        pages=2,
    )


@pytest.mark.parametrize(
    "output",
    [
        "[" * 256 + "]" * 256,
        '{"a":' * 255 + "1" + "}" * 255,
        '["' + "[" * 5000 + '"]',
        '"\\u0000"',
    ],
    ids=["256-arrays", "256-objects", "brackets-in-a-string", "escaped-NUL"],
)
def test_json_within_the_limits_is_passed_on_as_written(sandbox, output):
    report = run_guest(sandbox, complete_with(output))
    assert report.outcome == Completed(0, output)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("[" * 257 + "]" * 257, "workflow output is nested deeper than 256 levels"),
        ("NaN", "workflow output is not valid JSON"),
        ('{"x": -Infinity}', "workflow output is not valid JSON"),
        ('"a\x00b"', "workflow output is not valid JSON"),
        ("1" * 5000, "workflow output is not valid JSON"),
        ("", "workflow output is not valid JSON"),
    ],
    ids=["257-deep", "NaN", "Infinity", "raw-NUL", "5000-digits", "empty"],
)
def test_json_the_host_refuses(sandbox, output, message):
    assert crash_message(run_guest(sandbox, complete_with(output))) == message


def test_a_refused_return_value_is_named_as_such(sandbox):
    """The error of a bad return value says the return value failed, not a step."""
    outcome = run_guest(sandbox, complete_with("NaN")).outcome
    assert isinstance(outcome, GuestCrashed)
    assert outcome.where == "the workflow's return value was refused"


# -- NUL and UTF-8 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (begin(name_len=3), "step name contains a NUL character"),
        (
            "(call $sleep (i32.const 0) (i32.const 16) (i32.const 3) (i64.const 5) (i32.const 0))",
            "sleep name contains a NUL character",
        ),
        (
            "(call $wait_event (i32.const 0) (i32.const 20) (i32.const 1) (i32.const 16)"
            " (i32.const 3) (i64.const -1))",
            "event type contains a NUL character",
        ),
        (
            "(call $nondeterminism (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 3))",
            "nondeterminism name contains a NUL character",
        ),
        (begin(name_at=24, name_len=2), "step name is not UTF-8"),
    ],
    ids=["step", "sleep", "event-type", "nondeterminism", "not-utf8"],
)
def test_names_with_nul_or_bad_utf8_are_refused(sandbox, body, message):
    report = run_guest(sandbox, guest(body, data={16: b"a\x00b", 20: "w", 24: b"\xff\xfe"}))
    assert crash_message(report) == message


def test_nul_in_messages_and_log_lines_becomes_the_replacement_character(sandbox):
    """Free text keeps its content, with each NUL (and, in log lines, each byte that is not
    UTF-8) replaced by U+FFFD."""
    failed = run_guest(
        sandbox,
        guest(
            begin()
            + "(call $log (i32.const 1) (i32.const 32) (i32.const 5))"
            + "(drop (call $fd_write (i32.const 2) (i32.const 128) (i32.const 1) (i32.const 64)))"
            + "(call $step_failed (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 48)"
            " (i32.const 8) (i32.const 0))",
            data={
                16: "step",
                32: b"x\x00y\xffz",
                48: b"bad\x00news",
                96: b"out\x00\n",
                128: (96).to_bytes(4, "little") + (5).to_bytes(4, "little"),
            },
        ),
    )
    assert isinstance(failed.outcome, StepFailed)
    assert failed.outcome.message == "bad\ufffdnews"
    assert failed.logs == [(1, "x\ufffdy\ufffdz"), (3, "out\ufffd")]
    workflow = run_guest(
        sandbox,
        guest("(call $fail (i32.const 0) (i32.const 48) (i32.const 8))", data={48: b"bad\x00news"}),
    )
    assert workflow.outcome == WorkflowFailed(0, "bad\ufffdnews")


def test_messages_that_are_not_utf8_are_refused(sandbox):
    report = run_guest(
        sandbox,
        guest("(call $fail (i32.const 0) (i32.const 48) (i32.const 2))", data={48: b"\xc3("}),
    )
    assert crash_message(report) == "error message is not UTF-8"


# -- values --------------------------------------------------------------------------------


def decided(report: GuestReport):
    state = InstanceState(InstanceKey("acme", "i-1"), "d", InstanceStatus.RUNNING, 0)
    return decide(state, [], report, started_at=T0, finished_at=T0, limits=EngineLimits())


def sleep_guest(ms: int, flags: int) -> bytes:
    return guest(
        f"(call $sleep (i32.const 0) (i32.const 16) (i32.const 3) (i64.const {ms})"
        f" (i32.const {flags}))",
        data={16: "nap"},
    )


@pytest.mark.parametrize(
    ("ms", "flags", "message"),
    [
        (2**63 - 1, 0, "sleep 'nap' of 9223372036854775807 ms is out of range"),
        (10**13 + 1, 0, "sleep 'nap' of 10000000000001 ms is out of range"),
        (-(2**63), 0, "sleep 'nap' of -9223372036854775808 ms is out of range"),
        (2**63 - 1, 1, "sleep 'nap' until 9223372036854775807 is out of range"),
        (-(2**63), 1, "sleep 'nap' until -9223372036854775808 is out of range"),
        (-(10**13) - 1, 1, "sleep 'nap' until -10000000000001 is out of range"),
    ],
)
def test_sleep_values_the_host_cannot_represent_fail_the_run(sandbox, ms, flags, message):
    """Durations and Unix times beyond what the host can hold are refused by the sandbox (before,
    the engine raised OverflowError deciding them); the instance fails with the message."""
    report = run_guest(sandbox, sleep_guest(ms, flags))
    assert crash_message(report).startswith(message)
    decision = decided(report)
    assert decision.status is InstanceStatus.ERRORED
    assert message in (decision.error or "")


@pytest.mark.parametrize(
    ("ms", "flags", "status"),
    [
        (10**13, 0, InstanceStatus.ERRORED),  # over the 365-day limit: the engine says so
        (-(10**13), 0, InstanceStatus.RUNNING),  # a negative duration continues at once
        (0, 1, InstanceStatus.RUNNING),  # a time in the past continues at once
        (-(10**13), 1, InstanceStatus.RUNNING),  # before 1970 too
        (10**13, 1, InstanceStatus.ERRORED),
    ],
)
def test_sleep_values_in_range_are_decided_by_the_engine(sandbox, ms, flags, status):
    decision = decided(run_guest(sandbox, sleep_guest(ms, flags)))
    assert decision.status is status
    if status is InstanceStatus.ERRORED:
        assert "is over the limit of 31536000000 ms" in (decision.error or "")


def test_unknown_step_done_flags_are_refused_as_unsigned(sandbox):
    report = run_guest(
        sandbox,
        guest(
            begin() + "(call $step_done (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 32)"
            " (i32.const 4) (i32.const -1))",
            data={16: "step", 32: "true"},
        ),
    )
    assert crash_message(report) == "guest ABI violation: unknown step_done flags 0xffffffff"


# -- the last line of defence ----------------------------------------------------------------


def test_an_unexpected_host_error_fails_the_run_and_is_logged(order_wasm):
    """Should a host import raise anything unforeseen, the run crashes naming the import; the
    exception never reaches the worker, and the sandbox goes on running guests."""

    def broken_clock() -> float:
        raise ZeroDivisionError

    sandbox = WasmSandbox(clock=broken_clock)
    try:
        now = guest("(drop (call $now (i32.const 0)))")
        with capture_logs() as logs:
            report = run_guest(sandbox, now)
        assert crash_message(report) == "host error in stepfleet.now: ZeroDivisionError"
        assert [entry["event"] for entry in logs] == ["host_import_failed"]
        assert logs[0]["host_import"] == "stepfleet.now"
        after = run_guest(sandbox, order_wasm, json.dumps(ORDER_PARAMS)).outcome
        assert isinstance(after, StepSucceeded)
        assert after.name == "reserve"
    finally:
        sandbox.close()


def test_an_unexpected_error_outside_the_imports_fails_the_run(monkeypatch):
    """The same holds for anything else the host does during a run (here: writing the replay
    buffer into guest memory)."""
    sandbox = WasmSandbox()
    try:
        wasm = guest("")
        run_guest(sandbox, wasm)  # loaded
        monkeypatch.setattr(wasmtime.Memory, "write", _raise_runtime_error)
        with capture_logs() as logs:
            report = run_guest(sandbox, wasm)
        assert crash_message(report) == "host error: RuntimeError"
        assert [entry["event"] for entry in logs] == ["guest_run_failed"]
    finally:
        sandbox.close()


def _raise_runtime_error(*args: object, **kwargs: object) -> int:
    raise RuntimeError("boom")


# -- step timeouts -------------------------------------------------------------------------

TIMEOUT_CONFIG = '{"timeout_ms":150}'
SPIN = "(loop $spin (br $spin))"


@pytest.fixture(scope="module")
def roomy():
    """Fuel for minutes and a run timeout of an hour: only the step's timeout can stop a spin."""
    roomy = WasmSandbox(SandboxLimits(fuel_per_run=10**11, run_timeout_ms=3_600_000))
    yield roomy
    roomy.close()


def spinning_step(body: str, funcs: str = "") -> bytes:
    return guest(body, data={16: "spin", 32: TIMEOUT_CONFIG}, funcs=funcs)


BEGIN_SPIN = begin(config_at=32, config_len=len(TIMEOUT_CONFIG))


@pytest.mark.parametrize(
    ("body", "funcs"),
    [
        pytest.param(BEGIN_SPIN + SPIN, "", id="loop-in-the-function-that-began-the-step"),
        pytest.param(
            BEGIN_SPIN + "(call $spin)", f"(func $spin {SPIN})", id="loop-in-a-called-function"
        ),
        pytest.param(
            "(call $begin) " + SPIN,
            f"(func $begin {BEGIN_SPIN})",
            id="loop-in-the-caller-of-the-function-that-began-the-step",
        ),
        pytest.param(
            "(call $outer)",
            f"(func $outer {BEGIN_SPIN} (call $inner) {SPIN}) (func $inner (nop))",
            id="loop-after-a-call-in-a-nested-function",
        ),
    ],
)
def test_a_spinning_step_is_stopped_at_its_timeout_wherever_it_spins(roomy, body, funcs):
    """A loop in a function entered before step_begin (whose code still holds the run's long
    epoch deadline) is stopped by the step's own timeout, like a loop entered afterwards: the
    attempt fails as timed out (retryable), not by running out of fuel minutes later."""
    report = run_guest(roomy, spinning_step(body, funcs))
    assert isinstance(report.outcome, StepFailed)
    assert report.outcome.message == "step 'spin' timed out after 150 ms"
    assert (report.outcome.limit, report.outcome.non_retryable) == ("timeout", False)


def test_a_run_spinning_before_any_step_is_stopped_at_the_run_timeout():
    short = WasmSandbox(SandboxLimits(fuel_per_run=10**11, run_timeout_ms=150))
    try:
        report = run_guest(short, guest(SPIN))
    finally:
        short.close()
    assert report.outcome == GuestCrashed(
        "the run took longer than 150 ms",
        "timeout",
        "the workflow code failed between steps, at journal position 0",
    )


def test_after_stopping_a_spinning_step_the_sandbox_runs_guests_normally(roomy, order_wasm):
    run_guest(roomy, spinning_step(BEGIN_SPIN + SPIN))
    for _ in range(3):
        report = run_guest(roomy, order_wasm, json.dumps(ORDER_PARAMS))
        assert isinstance(report.outcome, StepSucceeded)
    assert ORDER_OUTPUT["reservation"] in report.outcome.result
