"""Property tests: every host import, driven with arbitrary pointers, lengths and values, ends
the run in a documented outcome that the engine can decide: never a Python exception."""

from __future__ import annotations

import json
import math
import struct
from datetime import UTC, datetime

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import GuestRun, SandboxLimits, WasmSandbox
from stepfleet.sandbox.abi import HOST_IMPORTS, HOST_MODULE, WASI_IMPORTS, WASI_MODULE
from stepfleet.sandbox.guest_json import MAX_JSON_DEPTH, parse_guest_json
from stepfleet.schemas import (
    CallRequested,
    Completed,
    EventAwaited,
    GuestCrashed,
    GuestReport,
    HttpResponse,
    InstanceKey,
    InstanceStatus,
    Nondeterministic,
    SleepRequested,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
    digest_of,
)
from tests.unit.test_sandbox_hostile import IMPORTS, wat_string

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALLOC = 1024
ARGS = 8
"""The replay buffer the fuzz guests get: 8 little-endian i64 slots, then a blob of data."""
BLOB = ALLOC + 8 * ARGS
PAGE = 65536
REQUEST = '{"method":"GET","url":"https://example.org/"}'
OUTCOMES = (
    CallRequested,
    StepSucceeded,
    StepFailed,
    SleepRequested,
    EventAwaited,
    Completed,
    WorkflowFailed,
    Nondeterministic,
    GuestCrashed,
)
TARGETS = [(HOST_MODULE, name, sig) for name, sig in HOST_IMPORTS.items()] + [
    (WASI_MODULE, name, sig) for name, sig in WASI_IMPORTS.items()
]


def fuzz_guest(name: str, signature: tuple[tuple[str, ...], tuple[str, ...]]) -> bytes:
    """A guest calling import `name` with the values in the buffer's slots 0-5.

    Slot 6 sets the scene first: 1 begins a step, 2 also makes an HTTP request (whose answer
    http_response may then copy). The call is made twice, for imports that return.
    """
    params, results = signature
    args = " ".join(
        f"(i64.load offset={8 * i} (local.get $ptr))"
        if kind == "i64"
        else f"(i32.wrap_i64 (i64.load offset={8 * i} (local.get $ptr)))"
        for i, kind in enumerate(params)
    )
    call = f"(call ${name} {args})"
    if results:
        call = f"(drop {call})"
    return wasmtime.wat2wasm(
        f"""(module
          {IMPORTS}
          (memory (export "memory") 1)
          (data (i32.const 16) "fuzz")
          (data (i32.const 32) "{wat_string(REQUEST)}")
          (func (export "sf_abi_version") (result i32) (i32.const 2))
          (func (export "sf_alloc") (param i32) (result i32) (i32.const {ALLOC}))
          (func (export "sf_run") (param $ptr i32) (param $len i32)
            (local $scene i64)
            (local.set $scene (i64.load offset=48 (local.get $ptr)))
            (if (i64.ne (local.get $scene) (i64.const 0))
              (then (drop (call $step_begin (i32.const 0) (i32.const 16) (i32.const 4)
                                            (i32.const 0) (i32.const 0)))))
            (if (i64.eq (local.get $scene) (i64.const 2))
              (then (drop (call $http_request (i32.const 32) (i32.const {len(REQUEST)})))))
            {call}
            {call}))"""
    )


@pytest.fixture(scope="module")
def fuzzed():
    """One sandbox with every fuzz guest compiled once: import name -> digest."""
    sandbox = WasmSandbox(SandboxLimits(fuel_per_run=10_000_000, memory_bytes=2 * PAGE))
    digests = {}
    for _, name, signature in TARGETS:
        wasm = fuzz_guest(name, signature)
        digests[name] = digest_of(wasm)
        sandbox.load(digests[name], wasm)
    yield sandbox, digests
    sandbox.close()


ANSWER = len(HttpResponse.failed("egress is not configured").to_json())
"""The length of the answer an http_request gets in these tests (no egress is configured)."""

# Per import: well-formed arguments (BLOB: the blob's address, LEN: its length) and the scene.
# Each example keeps some of them and replaces the others with hostile values, so that the
# checks behind the first ones are reached too.
LEN = -(2**40)
TEMPLATES: dict[str, tuple[tuple[int, ...], int]] = {
    "step_begin": ((0, 16, 4, BLOB, LEN), 0),
    "step_done": ((0, 16, 4, BLOB, LEN, 0), 1),
    "step_failed": ((0, 16, 4, BLOB, LEN, 0), 1),
    "sleep": ((0, BLOB, LEN, 5, 0), 0),
    "wait_event": ((0, 16, 4, BLOB, LEN, -1), 0),
    "now": ((0,), 0),
    "random": ((0, BLOB, 8), 0),
    "complete": ((0, BLOB, LEN), 0),
    "fail": ((0, BLOB, LEN), 0),
    "nondeterminism": ((0, 1, BLOB, LEN), 0),
    "log": ((1, BLOB, LEN), 0),
    "http_request": ((BLOB, LEN), 1),
    "http_response": ((BLOB, ANSWER), 2),
    "fd_write": ((1, BLOB, 2, 8), 0),
    "fd_close": ((1,), 0),
    "fd_seek": ((1, 0, 0, 8), 0),
    "fd_fdstat_get": ((1, 8), 0),
    "environ_sizes_get": ((8, 12), 0),
    "environ_get": ((8, 12), 0),
    "args_sizes_get": ((8, 12), 0),
    "args_get": ((8, 12), 0),
    "proc_exit": ((0,), 0),
}

U32_EDGES = [0, 1, 4, 16, 255, 256, 257, PAGE - 1, PAGE, PAGE + 1, 2**31 - 1, 2**31, 2**32 - 1]
I64_EDGES = [
    -(2**63),
    -1,
    0,
    1,
    10**13,
    10**13 + 1,
    -(10**13) - 1,
    365 * 86_400_000,
    365 * 86_400_000 + 1,
    2**53,
    2**63 - 1,
]

DEEP_BLOBS = ["[" * 2000, '{"a":' * 2000, '[{"a":' * 1000]
HOSTILE_BLOBS = [
    "fuzz",
    "a\x00b",
    '["' + "[" * 2000 + '"]',
    '{"timeout_ms":1}',
    '{"retries":{"limit":-1}}',
    "NaN",
    "1" * 5000,
    REQUEST,
    '{"method":"GET","url":"http://x/","headers":{"a":"\\u0000"}}',
]
blobs = st.one_of(
    st.sampled_from(DEEP_BLOBS).map(str.encode),
    st.sampled_from(HOSTILE_BLOBS).map(str.encode),
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=20,
    ).map(lambda value: json.dumps(value).encode()),
)


@st.composite
def calls(draw: st.DrawFn, name: str) -> bytes:
    """A replay buffer for a call of `name`: its template's slots, some replaced by values
    that point into the blob, near the end of memory or past 4 GiB, or are simply extreme."""
    template, scene = TEMPLATES[name]
    blob = draw(blobs)
    hostile = st.one_of(
        st.sampled_from(U32_EDGES),
        st.integers(BLOB, BLOB + len(blob)),
        st.integers(0, len(blob) + 2),
        st.integers(0, 2**32 - 1),
        st.sampled_from(I64_EDGES),
        st.integers(-(2**63), 2**63 - 1),
    )
    replaced = draw(st.sets(st.integers(0, len(template) - 1), max_size=3))
    slots = [
        draw(hostile) if index in replaced else len(blob) if value == LEN else value
        for index, value in enumerate(template)
    ]
    if draw(st.booleans()):
        scene = draw(st.sampled_from([0, 1, 2]))
    slots += [0] * (6 - len(slots))
    return struct.pack("<8q", *[_signed(s) for s in slots], scene, 0) + blob


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def _texts(report: GuestReport) -> list[str]:
    outcome = report.outcome
    fields = ("name", "message", "event_type", "result", "output")
    return [getattr(outcome, f) for f in fields if isinstance(getattr(outcome, f, None), str)] + [
        line for _, line in report.logs
    ]


@pytest.mark.parametrize(("module", "name", "signature"), TARGETS, ids=[t[1] for t in TARGETS])
@FUZZ
@given(data=st.data())
def test_any_call_of_a_host_import_ends_in_a_documented_outcome(
    fuzzed, module, name, signature, data
):
    sandbox, digests = fuzzed
    buffer = data.draw(calls(name))
    report = sandbox.run(GuestRun(digests[name], buffer))
    assert isinstance(report.outcome, OUTCOMES)
    if isinstance(report.outcome, GuestCrashed):
        assert not report.outcome.message.startswith("host error"), report.outcome
    assert all("\x00" not in text for text in _texts(report))
    assert len(report.logs) <= sandbox.limits.log_lines_per_run
    assert all(len(line) <= sandbox.limits.log_line_bytes for _, line in report.logs)
    if isinstance(report.outcome, CallRequested):
        return  # the cycle makes the call and runs the guest again: nothing to decide yet
    # The engine, which runs next in the same batch, decides whatever came out.
    state = InstanceState(InstanceKey("acme", "i-1"), "d", InstanceStatus.RUNNING, 0)
    decide(state, [], report, started_at=T0, finished_at=T0, limits=EngineLimits())


def test_the_fuzz_calls_every_import_the_abi_grants():
    assert set(TEMPLATES) == set(HOST_IMPORTS) | set(WASI_IMPORTS)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(value=json_values)
def test_guest_json_reads_json_values_as_written(value):
    assert parse_guest_json(json.dumps(value)) == value


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.text(alphabet='[]{}"\\,:01 a\x00', max_size=2000))
def test_guest_json_answers_any_text_with_a_value_or_a_value_error(text):
    """Brackets, quotes and escapes in any order: a value or ValueError, never RecursionError;
    a value only where the standard parser agrees."""
    try:
        value = parse_guest_json(text)
    except ValueError:
        return
    assert value == json.loads(text)


def test_guest_json_nesting_limit_is_exact():
    assert parse_guest_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(ValueError, match="nested deeper than 256 levels"):
        parse_guest_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_guest_json(json.dumps(math.inf))
