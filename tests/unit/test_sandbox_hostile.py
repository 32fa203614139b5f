"""Hostile guests against the host imports: every bad pointer, length, value and timeout ends as
a documented outcome (docs/guest-abi.md, *What the host checks*), never a Python exception."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import wasmtime

from stepfleet.sandbox import (
    GuestRun,
    ReplayJournal,
    SandboxLimits,
    WasmSandbox,
    encode_replay_buffer,
)
from stepfleet.sandbox.abi import HOST_IMPORTS, HOST_MODULE, WASI_IMPORTS, WASI_MODULE
from stepfleet.schemas import (
    Completed,
    GuestCrashed,
    GuestReport,
    digest_of,
)

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


def run_guest(sandbox: WasmSandbox, wasm: bytes, params: str = "{}") -> GuestReport:
    digest = digest_of(wasm)
    if not sandbox.is_loaded(digest):
        sandbox.load(digest, wasm)
    return sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", params, ReplayJournal())))


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
