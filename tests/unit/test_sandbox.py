"""The wasmtime sandbox with the example and hostile modules, and golden journals, no services."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import wasmtime

from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import (
    GuestRun,
    InvalidModule,
    ReplayJournal,
    SandboxLimits,
    WasmSandbox,
    encode_replay_buffer,
)
from stepfleet.sandbox.step_config import parse_step_config
from stepfleet.schemas import (
    Backoff,
    Completed,
    EntryFlags,
    EntryKind,
    GuestCrashed,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    StepConfig,
    StepFailed,
    StepSucceeded,
    digest_of,
)
from tests.conftest import hostile_wasm

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORDER_PARAMS = '{"order_id":"A-1","amount":4200,"items":3}'
ORDER_OUTPUT = (
    '{"order":"A-1","reservation":"RSV-A-1","items":3,"charged":4200,"tracking":"TRK-A-1-A7237DDA"}'
)


@pytest.fixture(scope="module")
def sandbox() -> WasmSandbox:
    return WasmSandbox(SandboxLimits(fuel_per_run=50_000_000, memory_bytes=8 * 1024 * 1024))


def load(sandbox: WasmSandbox, wasm: bytes) -> str:
    digest = digest_of(wasm)
    sandbox.load(digest, wasm)
    return digest


def drive(
    sandbox: WasmSandbox, digest: str, params: str, entries: list[JournalEntry] | None = None
):
    """Run deliveries until the instance is final, as the fleet would; return the last decision."""
    journal = ReplayJournal(entries or [])
    key = InstanceKey("acme", "i-1")
    for _ in range(50):
        report = sandbox.run(
            GuestRun(digest, encode_replay_buffer(key.instance_id, params, journal), len(journal))
        )
        state = InstanceState(key, digest, InstanceStatus.RUNNING, len(journal))
        decision = decide(
            state, journal.entries, report, started_at=T0, finished_at=T0, limits=EngineLimits()
        )
        journal.extend(decision.entries)
        if decision.status.is_final:
            return decision, journal
    raise AssertionError("the workflow did not finish in 50 runs")


def test_order_runs_one_new_step_per_run(sandbox, order_wasm):
    """Each run over the journal so far reports exactly the next step."""
    digest = load(sandbox, order_wasm)
    report = sandbox.run(
        GuestRun(digest, encode_replay_buffer("i-1", ORDER_PARAMS, ReplayJournal()))
    )
    assert isinstance(report.outcome, StepSucceeded)
    assert (report.outcome.seq, report.outcome.name, report.outcome.result) == (
        0,
        "reserve",
        '{"reservation":"RSV-A-1","items":3}',
    )
    assert report.outcome.flags & EntryFlags.HAS_ROLLBACK
    assert report.logs == [(1, "reserving 3 item(s) for order A-1")]


def test_order_completes_with_its_documented_output(sandbox, order_wasm):
    """Driven to the end, the C example completes with the output its README documents."""
    decision, journal = drive(sandbox, load(sandbox, order_wasm), ORDER_PARAMS)
    assert decision.status is InstanceStatus.COMPLETE
    assert decision.output == ORDER_OUTPUT
    assert [e.name for e in journal.entries] == ["reserve", "charge", "ship"]


def test_greeter_completes(sandbox, greeter_wasm):
    """The AssemblyScript example completes over the same ABI."""
    decision, journal = drive(sandbox, load(sandbox, greeter_wasm), '{"name":"Ada","lang":"en"}')
    assert decision.status is InstanceStatus.COMPLETE, decision.error
    assert decision.output == '{"message":"Hello, Ada!","lang":"en","receipt":"RCPT-11ea6ce0"}'
    assert [e.name for e in journal.entries] == ["lookup", "compose", "deliver"]


def golden(name: str) -> tuple[str, list[JournalEntry], dict[str, str]]:
    data = json.loads((GOLDEN / name).read_text())
    entries = [
        JournalEntry(
            e["seq"],
            EntryKind[e["kind"].upper()],
            e["name"],
            e["value"],
            flags=EntryFlags(e.get("flags", 0)),
        )
        for e in data["journal"]
    ]
    return data["params"], entries, data["expect"]


@pytest.mark.parametrize(
    "name", ["order_complete.json", "order_nondeterministic.json", "order_failed_charge.json"]
)
def test_golden_journals_replay(sandbox, order_wasm, name):
    """Recorded journals replay to the recorded result, guarding the ABI and journal format."""
    params, entries, expect = golden(name)
    report = sandbox.run(
        GuestRun(
            load(sandbox, order_wasm),
            encode_replay_buffer("i-1", params, ReplayJournal(entries)),
            len(entries),
        )
    )
    state = InstanceState(InstanceKey("acme", "i-1"), "d", InstanceStatus.RUNNING, len(entries))
    decision = decide(state, entries, report, started_at=T0, finished_at=T0, limits=EngineLimits())
    assert decision.status.value == expect["status"]
    if "output" in expect:
        assert decision.output == expect["output"]
    if "error" in expect:
        assert decision.error == expect["error"]
    if "mode" in expect:
        assert decision.mode.name.lower() == expect["mode"]


def test_replay_answers_from_the_journal_not_by_rerunning(sandbox, order_wasm):
    """A recorded result is handed back as recorded, even if the step would compute another."""
    entries = [
        JournalEntry(0, EntryKind.STEP_SUCCEEDED, "reserve", '{"reservation":"RSV-X","items":9}'),
        JournalEntry(1, EntryKind.STEP_SUCCEEDED, "charge", '{"charged":1,"payment":"PAY-X"}'),
        JournalEntry(2, EntryKind.STEP_SUCCEEDED, "ship", '{"tracking":"TRK-X"}'),
    ]
    report = sandbox.run(
        GuestRun(
            load(sandbox, order_wasm),
            encode_replay_buffer("i-1", ORDER_PARAMS, ReplayJournal(entries)),
            len(entries),
        )
    )
    assert isinstance(report.outcome, Completed)
    assert json.loads(report.outcome.output)["tracking"] == "TRK-X"


@pytest.mark.parametrize(
    ("module", "limit", "text"),
    [
        ("loop", "cpu", "CPU limit exceeded"),
        ("membomb", "memory", "memory limit exceeded"),
        ("recursion", "stack", "stack limit exceeded"),
        ("huge_output", "output", "the limit is 1048576"),
        ("returns_without_outcome", None, "guest returned without an outcome"),
    ],
)
def test_hostile_modules_fail_their_step_with_a_named_limit(sandbox, module, limit, text):
    """Each hostile module ends its run as a crash that says what happened; the host survives."""
    digest = load(sandbox, hostile_wasm(module))
    report = sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", "{}", ReplayJournal())))
    assert isinstance(report.outcome, GuestCrashed)
    assert report.outcome.limit == limit
    assert text in report.outcome.message


def test_a_trap_inside_a_step_is_a_failed_attempt(sandbox):
    """A trap after step_begin fails that step's attempt (retryable), keeping its log line."""
    digest = load(sandbox, hostile_wasm("trap_mid_step"))
    report = sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", "{}", ReplayJournal())))
    assert isinstance(report.outcome, StepFailed)
    assert report.outcome.name == "explode"
    assert not report.outcome.non_retryable
    assert report.outcome.message == "guest trapped: wasm `unreachable` instruction executed"
    assert report.logs == [(1, "starting step explode")]


def test_sandbox_still_runs_good_guests_after_hostile_ones(sandbox, order_wasm):
    """After every hostile run, the same sandbox runs a good module normally."""
    for module in ("loop", "membomb", "recursion"):
        digest = load(sandbox, hostile_wasm(module))
        sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", "{}", ReplayJournal())))
    decision, _ = drive(sandbox, load(sandbox, order_wasm), ORDER_PARAMS)
    assert decision.output == ORDER_OUTPUT


@pytest.mark.parametrize(
    ("wasm", "message"),
    [
        (b"\x00asm\x01\x00\x00\x00garbage", "not a valid WebAssembly module"),
        (b"hello, not wasm at all", "not a valid WebAssembly module"),
    ],
)
def test_validate_refuses_bytes_that_are_not_wasm(sandbox, wasm, message):
    """Garbage is refused with a clear message."""
    with pytest.raises(InvalidModule, match=message):
        sandbox.validate(wasm)


def test_validate_refuses_imports_outside_the_abi(sandbox):
    """A module importing what the ABI does not grant is refused, naming the import."""
    with pytest.raises(
        InvalidModule, match=r"imports env\.socket, which the guest ABI does not grant"
    ):
        sandbox.validate(hostile_wasm("bad_import"))


def test_validate_refuses_modules_without_the_abi_exports(sandbox):
    """A valid module that exports nothing useful is refused, pointing at the SDKs."""
    with pytest.raises(InvalidModule, match="does not export"):
        sandbox.validate(hostile_wasm("no_exports"))


def test_validate_refuses_oversized_modules():
    """The module size limit is enforced at push."""
    small = WasmSandbox(SandboxLimits(module_bytes=1024))
    with pytest.raises(InvalidModule, match="the limit is 1024"):
        small.validate(b"\x00asm" + bytes(2048))


def test_load_refuses_bytes_that_do_not_match_the_digest(sandbox, order_wasm):
    """The compiled-module cache is keyed by content: a wrong digest is refused."""
    with pytest.raises(InvalidModule, match="do not hash to"):
        sandbox.load("sha256:" + "0" * 64, order_wasm)


def test_examples_import_only_what_the_abi_grants(sandbox, order_wasm, greeter_wasm):
    """The committed example modules pass push validation."""
    sandbox.validate(order_wasm)
    sandbox.validate(greeter_wasm)


def playbook_run(sandbox: WasmSandbox, wasm: bytes, *ops: dict[str, object]):
    digest = load(sandbox, wasm)
    params = json.dumps({"ops": list(ops)})
    return sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", params, ReplayJournal())))


def test_now_and_random_are_recorded_outside_steps_only(sandbox, playbook_wasm):
    """Values taken by the program are journaled; values taken inside a step are not."""
    report = playbook_run(
        sandbox,
        playbook_wasm,
        {"op": "now", "name": "t"},
        {"op": "random", "name": "r", "bytes": 3},
        {"op": "do", "name": "a", "now_inside": True},
    )
    assert [(r.seq, r.kind) for r in report.recorded] == [
        (0, EntryKind.NOW),
        (1, EntryKind.RANDOM),
    ]
    assert len(report.recorded[1].value) == 6
    assert isinstance(report.outcome, StepSucceeded)
    assert report.outcome.seq == 2
    assert "now" in json.loads(report.outcome.result)


def test_step_timeout_stops_a_spinning_attempt(playbook_wasm):
    """The epoch deadline ends an attempt that runs past its timeout, as a retryable failure."""
    roomy = WasmSandbox(SandboxLimits(fuel_per_run=10**12))
    report = playbook_run(
        roomy, playbook_wasm, {"op": "do", "name": "slow", "spin": True, "timeout_ms": 50}
    )
    assert isinstance(report.outcome, StepFailed)
    assert report.outcome.message == "step 'slow' timed out after 50 ms"
    assert (report.outcome.limit, report.outcome.non_retryable) == ("timeout", False)
    roomy.close()


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"retries": {"limit": 5000}}, "retries.limit is 5000, allowed 0 to 1000"),
        ({"timeout_ms": 0}, "timeout_ms is 0, allowed 1 to"),
        ({"retries": {"delay_ms": 10**13}}, "retries.delay_ms is 10000000000000"),
    ],
)
def test_step_config_out_of_range_is_refused(sandbox, playbook_wasm, op, message):
    report = playbook_run(sandbox, playbook_wasm, {"op": "do", "name": "a", **op})
    assert isinstance(report.outcome, GuestCrashed)
    assert report.outcome.message.startswith("step 'a' config: ")
    assert message in report.outcome.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"retry":{}}', "unknown field retry"),
        ('{"retries":{"tries":1}}', "unknown field retries.tries"),
        (
            '{"retries":{"backoff":"fast"}}',
            "retries.backoff must be constant, linear or exponential",
        ),
        ('{"timeout_ms":"10"}', "timeout_ms must be an integer"),
        ('{"timeout_ms":true}', "timeout_ms must be an integer"),
    ],
)
def test_step_config_parser_names_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_step_config(text, max_ms=1000)


def test_step_config_defaults_and_values():
    assert parse_step_config("", max_ms=1000) == StepConfig()
    config = parse_step_config(
        '{"retries":{"limit":2,"delay_ms":5,"backoff":"linear"},"timeout_ms":9}', max_ms=1000
    )
    assert config == StepConfig(2, 5, Backoff.LINEAR, 9)


def test_modules_for_another_abi_version_are_refused(sandbox):
    v1 = wasmtime.wat2wasm(
        """(module (memory (export "memory") 1)
           (func (export "sf_abi_version") (result i32) (i32.const 1))
           (func (export "sf_alloc") (param i32) (result i32) (i32.const 16))
           (func (export "sf_run") (param i32 i32)))"""
    )
    with pytest.raises(InvalidModule, match="module speaks guest ABI 1, this host speaks 2"):
        sandbox.validate(v1)


def test_names_over_the_limit_are_refused(sandbox):
    """A step name longer than 256 bytes fails the run with the limit in the message."""
    name = "n" * 300
    module = wasmtime.wat2wasm(
        f"""(module
          (import "stepfleet" "step_begin" (func $begin (param i32 i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "{name}")
          (func (export "sf_abi_version") (result i32) (i32.const 2))
          (func (export "sf_alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "sf_run") (param i32 i32)
            (drop (call $begin (i32.const 0) (i32.const 16) (i32.const 300) (i32.const 0)
                               (i32.const 0)))))"""
    )
    digest = load(sandbox, module)
    report = sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", "{}", ReplayJournal())))
    assert isinstance(report.outcome, GuestCrashed)
    assert report.outcome.message == "step name is 300 bytes, the limit is 256"


def _reactor(initialize: str, run_body: str = "") -> bytes:
    """A module whose `_initialize` export is `initialize` and whose run completes with the
    output a global holds ("1", or "2" once `_initialize` ran)."""
    return wasmtime.wat2wasm(
        f"""(module
          (import "stepfleet" "complete" (func $complete (param i32 i32 i32)))
          (memory (export "memory") 1)
          (global $ran (mut i32) (i32.const 49))
          (data (i32.const 16) "1")
          {initialize}
          (func (export "sf_abi_version") (result i32) (i32.const 2))
          (func (export "sf_alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "sf_run") (param $ptr i32) (param $len i32)
            {run_body}
            (i32.store8 (i32.const 16) (global.get $ran))
            (call $complete (i32.const 0) (i32.const 16) (i32.const 1))))"""
    )


@pytest.mark.parametrize(
    ("initialize", "output"),
    [
        ("", "1"),
        ('(func (export "_initialize") (global.set $ran (i32.const 50)))', "2"),
        ('(global (export "_initialize") i32 (i32.const 0))', "1"),
    ],
)
def test_initialize_runs_before_the_workflow_when_exported_as_a_function(
    sandbox, initialize, output
):
    digest = load(sandbox, _reactor(initialize))
    report = sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", "{}", ReplayJournal())))
    assert report.outcome == Completed(0, output)


def test_an_initialize_that_takes_arguments_fails_the_run_by_name(sandbox):
    digest = load(sandbox, _reactor('(func (export "_initialize") (param i32))'))
    report = sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", "{}", ReplayJournal())))
    assert report.outcome == GuestCrashed(
        "guest error: _initialize must take no arguments and return nothing"
    )


def test_the_run_receives_the_buffer_where_sf_alloc_put_it(sandbox):
    """sf_run gets sf_alloc's pointer and the buffer's length; a trap in it is reported."""
    body = """(if (i32.ne (local.get $ptr) (i32.const 1024)) (then unreachable))
              (if (i32.ne (i32.load8_u (local.get $ptr)) (i32.const 2)) (then unreachable))
              (if (i32.gt_u (local.get $len) (i32.const 200)) (then unreachable))"""
    digest = load(sandbox, _reactor("", body))
    buffer = encode_replay_buffer("i-1", "{}", ReplayJournal())
    report = sandbox.run(GuestRun(digest, buffer))
    assert report.outcome == Completed(0, "1")
    long_params = '{"p":"' + "x" * 300 + '"}'
    report = sandbox.run(
        GuestRun(digest, encode_replay_buffer("i-1", long_params, ReplayJournal()))
    )
    assert isinstance(report.outcome, GuestCrashed)
    assert "unreachable" in report.outcome.message
