"""The local runner (`stepfleet run`) on every example, with no services and virtual time."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stepfleet.cli.main import app
from stepfleet.schemas import EntryKind, InstanceStatus
from stepfleet.workers.local import parse_event, run_locally
from tests.conftest import EXAMPLES, ORDER_OUTPUT, ORDER_PARAMS

WEEK_MS = 7 * 86_400_000


def local(wasm: bytes, params: object, events: list[tuple[str, str]] | None = None):
    lines: list[str] = []
    result = run_locally(wasm, json.dumps(params), events=events or [], say=lines.append)
    return result, lines


def test_order_completes(order_wasm):
    result, lines = local(order_wasm, ORDER_PARAMS)
    assert result.status is InstanceStatus.COMPLETE
    assert json.loads(result.output or "") == ORDER_OUTPUT
    assert [e.name for e in result.journal] == ["reserve", "charge", "ship"]
    assert lines[-1] == f"complete: {result.output}"


def test_order_failure_compensates(order_wasm):
    result, _ = local(order_wasm, {**ORDER_PARAMS, "fail_at": "charge"})
    assert result.status is InstanceStatus.ERRORED
    assert result.error == "workflow failed: charge failed: card declined for order A-1"
    assert [(e.name, e.kind) for e in result.journal] == [
        ("reserve", EntryKind.STEP_SUCCEEDED),
        ("charge", EntryKind.STEP_FAILED),
        ("reserve", EntryKind.COMPENSATED),
    ]
    assert result.journal[-1].value == '{"released":"RSV-A-1"}'


def test_order_recovers_after_a_retry(order_wasm):
    """Retry delays are skipped, and the failed attempt is reported."""
    result, lines = local(order_wasm, {**ORDER_PARAMS, "fail_at": "charge", "fail_mode": "once"})
    assert json.loads(result.output or "") == ORDER_OUTPUT
    assert [(a.name, a.attempt) for a in result.attempts] == [("charge", 1)]
    assert result.journal[1].attempt == 2
    assert any("attempt 1 failed" in line and "skipped" in line for line in lines)


def test_greeter_completes(greeter_wasm):
    result, _ = local(greeter_wasm, {"name": "Ada", "lang": "en"})
    assert result.output == '{"message":"Hello, Ada!","lang":"en","receipt":"RCPT-11ea6ce0"}'


def test_reminder_with_and_without_its_event(reminder_wasm):
    params = {"user": "ada", "delay_ms": WEEK_MS, "timeout_ms": 60_000}
    acked, lines = local(reminder_wasm, params, [("reminder.ack", '{"ok":true}')])
    out = json.loads(acked.output or "")
    assert (out["acked"], out["timed_out"]) == ({"ok": True}, False)
    assert any("sleep until-due" in line and "(skipped)" in line for line in lines)
    silent, _ = local(reminder_wasm, params)
    assert json.loads(silent.output or "")["timed_out"] is True
    assert any(e.kind is EntryKind.EVENT_TIMED_OUT for e in silent.journal)


def test_reminder_failure_cancels_the_reminder(reminder_wasm):
    params = {"user": "ada", "delay_ms": 10, "timeout_ms": 10, "fail_after_remind": True}
    result, _ = local(reminder_wasm, params)
    assert result.status is InstanceStatus.ERRORED
    assert result.error == "workflow failed: reminder failed on purpose"
    assert [e.name for e in result.journal if e.kind is EntryKind.COMPENSATED] == ["remind"]


def test_playbook_runs_every_primitive(playbook_wasm):
    ops = [
        {"op": "now", "name": "t0"},
        {"op": "random", "name": "r", "bytes": 4},
        {"op": "do", "name": "flaky", "fail_times": 2, "retries": {"limit": 3, "delay_ms": 5000}},
        {"op": "sleep", "name": "week", "ms": WEEK_MS},
        {"op": "wait", "name": "approve", "type": "approval"},
        {"op": "wait", "name": "never", "type": "nobody", "timeout_ms": 1000},
        {"op": "now", "name": "t1"},
    ]
    result, _ = local(playbook_wasm, {"ops": ops}, [("approval", '{"by":"me"}')])
    out = json.loads(result.output or "")
    assert out["flaky"] == {"step": "flaky", "attempt": 3}
    assert out["approve"] == {"by": "me"}
    assert "timed out" in out["never"]["timeout"]
    assert len(out["r"]) == 8
    assert out["t1"] - out["t0"] >= WEEK_MS  # virtual time moved past the week's sleep
    kinds = [e.kind for e in result.journal]
    assert kinds == [
        EntryKind.NOW,
        EntryKind.RANDOM,
        EntryKind.STEP_SUCCEEDED,
        EntryKind.SLEPT,
        EntryKind.EVENT_RECEIVED,
        EntryKind.EVENT_TIMED_OUT,
        EntryKind.NOW,
    ]


def test_parse_event_needs_type_and_json():
    assert parse_event('go={"a": 1}') == ("go", '{"a":1}')
    for bad in ("go", "=1", "go={"):
        with pytest.raises(ValueError, match="event"):
            parse_event(bad)


def test_cli_run_exits_by_outcome():
    cli = CliRunner()
    order = str(EXAMPLES / "order" / "order.wasm")
    ok = cli.invoke(app, ["run", order, "--params", json.dumps(ORDER_PARAMS)])
    assert ok.exit_code == 0, ok.output
    assert "[0] step reserve" in ok.output
    assert ok.output.strip().endswith(json.dumps(ORDER_OUTPUT, separators=(",", ":")))
    failing = cli.invoke(
        app, ["run", order, "--params", json.dumps({**ORDER_PARAMS, "fail_at": "ship"})]
    )
    assert failing.exit_code == 1
    assert "errored: workflow failed: ship failed" in failing.output
    bad = cli.invoke(app, ["run", order, "--params", "{nope"])
    assert bad.exit_code == 1
    assert "--params is not JSON" in bad.output
    bad_event = cli.invoke(app, ["run", order, "--event", "nope"])
    assert bad_event.exit_code == 1
    assert "must look like TYPE=JSON" in bad_event.output
