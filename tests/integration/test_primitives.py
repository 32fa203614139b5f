"""Every durable primitive end to end through RabbitMQ and PostgreSQL, with the playbook module.

Short sleeps and retries really wait (tens of milliseconds); long timers are brought forward by
moving their due time in the database, never by waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from sqlalchemy import text

from stepfleet.client import CreateRequest, EventRequest, Producer
from stepfleet.control import ControlError
from stepfleet.schemas import REDACTED, EntryKind, InstanceKey, InstanceStatus
from stepfleet.store import InstanceDetail, PgStore
from tests.integration.conftest import wait_for_status, wait_until
from tests.integration.test_fleet import create, dead_letter_of, new_id, push

pytestmark = pytest.mark.services

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED}
WEEK_MS = 7 * 86_400_000


async def finished(store: PgStore, key: InstanceKey, timeout: float = 20.0) -> InstanceDetail:
    await wait_for_status(store, key, FINAL, timeout)
    detail = await store.detail(key)
    assert detail is not None
    return detail


async def reached(store: PgStore, key: InstanceKey, status: InstanceStatus) -> InstanceDetail:
    await wait_for_status(store, key, {status})
    detail = await store.detail(key)
    assert detail is not None
    return detail


def output(detail: InstanceDetail) -> dict[str, Any]:
    assert detail.record.status is InstanceStatus.COMPLETE, detail.record.error
    assert detail.record.output is not None
    return json.loads(detail.record.output)


async def send_event(settings, topology, key: InstanceKey, kind: str, payload: Any, event_id: str):
    async with Producer(settings.amqp_url, topology) as producer:
        await producer.send_event(
            EventRequest(key.tenant, key.instance_id, kind, payload, event_id)
        )


async def status_of(store: PgStore, key: InstanceKey) -> InstanceStatus:
    detail = await store.detail(key)
    assert detail is not None
    return detail.record.status


async def bring_timer_forward(store: PgStore, key: InstanceKey) -> None:
    """Make the instance's timer due now, as if its days had passed."""
    async with store._engine.begin() as connection:
        await connection.execute(
            text("UPDATE instances SET wake_at = now() WHERE tenant = :t AND id = :i"),
            {"t": key.tenant, "i": key.instance_id},
        )


# -- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("backoff", ["constant", "linear", "exponential"])
async def test_retries_recover_and_exhaust_with_each_backoff(
    store, start_worker, playbook, backoff
):
    """A step failing twice recovers on attempt 3; one failing every time ends with its error
    handed to the program after limit + 1 attempts. Every attempt is recorded."""
    await start_worker()
    retries = {"limit": 2, "delay_ms": 20, "backoff": backoff}
    recovers = await playbook({"op": "do", "name": "a", "fail_times": 2, "retries": retries})
    exhausts = await playbook({"op": "do", "name": "a", "fail_times": 99, "retries": retries})

    recovered = await finished(store, recovers)
    assert output(recovered) == {"a": {"step": "a", "attempt": 3}}
    assert [(e.name, e.kind, e.attempt) for e in recovered.journal] == [
        ("a", EntryKind.STEP_SUCCEEDED, 3)
    ]
    assert [(a.attempt, a.error) for a in recovered.attempts] == [
        (1, "attempt 1 failed"),
        (2, "attempt 2 failed"),
    ]
    # The retry waited for its backoff timer: attempt 2 began after attempt 1 ended + delay.
    first, second = recovered.attempts
    assert (second.started_at - first.finished_at).total_seconds() >= 0.02

    exhausted = await finished(store, exhausts)
    assert output(exhausted) == {"a": {"error": "attempt 3 failed"}}
    assert [(e.kind, e.attempt) for e in exhausted.journal] == [(EntryKind.STEP_FAILED, 3)]
    assert len(exhausted.attempts) == 2


async def test_non_retryable_failure_fails_the_instance_at_once(store, start_worker, playbook):
    await start_worker()
    key = await playbook(
        {"op": "do", "name": "a", "fail_times": 9, "non_retryable": True, "propagate": True}
    )
    detail = await finished(store, key)
    assert detail.record.status is InstanceStatus.ERRORED
    assert detail.record.error == "workflow failed: step a failed: attempt 1 failed"
    assert [(e.kind, e.attempt) for e in detail.journal] == [(EntryKind.STEP_FAILED, 1)]
    assert detail.attempts == []


async def test_attempt_over_its_timeout_is_stopped_and_retried(store, start_worker, playbook):
    """A step spinning past its per-attempt timeout fails that attempt; the retry succeeds."""
    await start_worker(fuel_per_run=10**12)
    key = await playbook(
        {
            "op": "do",
            "name": "slow",
            "spin": True,
            "fail_times": 1,
            "timeout_ms": 100,
            "retries": {"limit": 1, "delay_ms": 10},
        }
    )
    detail = await finished(store, key)
    assert output(detail) == {"slow": {"step": "slow", "attempt": 2}}
    assert [a.error for a in detail.attempts] == ["step 'slow' timed out after 100 ms"]


# -- sleeps ------------------------------------------------------------------------------


async def test_short_sleeps_fire_after_their_time(store, start_worker, playbook):
    """sleep and sleep_until park the instance in PostgreSQL; it goes on once they are due."""
    await start_worker()
    until = int(time.time() * 1000) + 300
    key = await playbook(
        {"op": "sleep", "name": "nap", "ms": 200},
        {"op": "sleep_until", "name": "alarm", "at_ms": until},
        {"op": "now", "name": "woke"},
    )
    detail = await finished(store, key)
    out = output(detail)
    assert out["nap"] is True
    assert out["alarm"] is True
    assert out["woke"] >= until  # the recorded clock after the sleeps is past the alarm
    kinds = [(e.kind, e.name) for e in detail.journal]
    assert kinds == [
        (EntryKind.SLEPT, "nap"),
        (EntryKind.SLEPT, "alarm"),
        (EntryKind.NOW, ""),
    ]
    assert detail.journal[1].value == str(until)


async def test_a_week_long_sleep_survives_a_worker_restart(store, start_worker, playbook):
    """The timer lives in PostgreSQL: a new worker fires it once it is due."""
    first = await start_worker(name="first")
    key = await playbook({"op": "sleep", "name": "week", "ms": WEEK_MS}, {"op": "now", "name": "t"})
    sleeping = await reached(store, key, InstanceStatus.SLEEPING)
    assert sleeping.record.waiting is not None
    assert sleeping.record.waiting.name == "week"
    first.stop()
    await start_worker(name="second")
    await bring_timer_forward(store, key)
    assert output(await finished(store, key))["week"] is True


async def test_a_worker_waits_for_the_next_timer_in_the_table_not_for_its_next_poll(
    store, start_worker, playbook
):
    """A timer another worker parked fires when it is due, although the worker left to fire
    it polls only once an hour: the timer loop sleeps until the next timer of the table."""
    parker = await start_worker(name="parker")
    key = await playbook({"op": "sleep", "name": "nap", "ms": 4000}, {"op": "now", "name": "t"})
    await reached(store, key, InstanceStatus.SLEEPING)
    parker.stop()
    await wait_until(lambda: parker.health.state == "stopped", "the parker stopping", 10)
    await start_worker(name="hourly", timer_poll_seconds=3600.0)
    assert output(await finished(store, key))["nap"] is True


# -- events ------------------------------------------------------------------------------


async def test_event_sent_while_the_instance_waits(
    settings, topology, store, start_worker, playbook
):
    await start_worker()
    key = await playbook(
        {"op": "wait", "name": "approve", "type": "approval", "timeout_ms": 60_000}
    )
    waiting = await reached(store, key, InstanceStatus.WAITING)
    assert waiting.record.waiting is not None
    assert waiting.record.waiting.event_type == "approval"
    await send_event(settings, topology, key, "approval", {"by": "ops"}, "e-1")
    detail = await finished(store, key)
    assert output(detail) == {"approve": {"by": "ops"}}
    assert detail.journal[0].kind is EntryKind.EVENT_RECEIVED


async def test_event_sent_before_the_wait_is_kept_and_sent_once(
    settings, topology, store, start_worker, playbook
):
    """An early event waits for its wait; the same event id sent twice is delivered once."""
    await start_worker()
    key = await playbook(
        {"op": "sleep", "name": "nap", "ms": 300},
        {"op": "wait", "name": "first", "type": "approval", "timeout_ms": 60_000},
        {"op": "wait", "name": "second", "type": "approval", "timeout_ms": 200},
    )
    await reached(store, key, InstanceStatus.SLEEPING)
    for _ in range(2):
        await send_event(settings, topology, key, "approval", {"n": 1}, "same-id")
    out = output(await finished(store, key))
    assert out["first"] == {"n": 1}
    assert out["second"] == {"timeout": "wait 'second' for event 'approval' timed out after 200 ms"}


async def test_event_timeout_is_handed_to_the_program(store, start_worker, playbook):
    await start_worker()
    key = await playbook(
        {"op": "wait", "name": "w", "type": "approval", "timeout_ms": 100},
        {"op": "do", "name": "after"},
    )
    detail = await finished(store, key)
    assert output(detail)["w"] == {
        "timeout": "wait 'w' for event 'approval' timed out after 100 ms"
    }
    assert detail.journal[0].kind is EntryKind.EVENT_TIMED_OUT


async def test_event_for_a_finished_instance_is_refused(
    settings, topology, broker, store, start_worker, playbook
):
    await start_worker()
    key = await playbook({"op": "do", "name": "a"})
    await finished(store, key)
    await send_event(settings, topology, key, "late", None, "late-1")
    letter = await dead_letter_of(store, key.instance_id)
    assert letter.reason == "instance-finished"


# -- operator actions --------------------------------------------------------------------


async def test_pause_and_resume_while_sleeping(store, control, start_worker, playbook):
    """A paused instance's due timer does not fire; resume lets it."""
    worker = await start_worker()
    key = await playbook({"op": "sleep", "name": "s", "ms": WEEK_MS}, {"op": "do", "name": "a"})
    await reached(store, key, InstanceStatus.SLEEPING)
    await control.pause(key)
    await bring_timer_forward(store, key)
    sent = worker.wakes_sent
    await _timer_checks(worker, 3)
    assert worker.wakes_sent == sent
    assert await status_of(store, key) is InstanceStatus.PAUSED
    await control.resume(key)
    assert output(await finished(store, key))["a"] == {"step": "a", "attempt": 1}


async def _timer_checks(worker, count: int) -> None:
    """Wait until the worker's timer loop has run `count` whole polls begun after this call.

    Each poll that reached the store stamps `health.store_ok_at` once its due timers are sent;
    the first stamp seen may end a poll begun earlier, so `count + 1` stamps are awaited.
    """
    stamps = [worker.health.store_ok_at]

    def polled() -> bool:
        if worker.health.store_ok_at != stamps[-1]:
            stamps.append(worker.health.store_ok_at)
        return len(stamps) > count + 1

    await wait_until(polled, f"{count} timer polls")


async def test_pause_and_resume_while_waiting_keeps_the_event(
    settings, topology, store, control, start_worker, playbook
):
    await start_worker()
    key = await playbook({"op": "wait", "name": "w", "type": "go", "timeout_ms": 60_000})
    await reached(store, key, InstanceStatus.WAITING)
    await control.pause(key)
    await send_event(settings, topology, key, "go", {"ok": True}, "go-1")
    for _ in range(100):
        detail = await store.detail(key)
        assert detail is not None
        if detail.pending_events:
            break
        await asyncio.sleep(0.05)
    assert detail.record.status is InstanceStatus.PAUSED
    assert detail.pending_events == 1
    await control.resume(key)
    assert output(await finished(store, key)) == {"w": {"ok": True}}


async def test_pause_mid_flow_holds_a_pending_retry(store, control, start_worker, playbook):
    """Paused between attempts, the retry waits for resume; the step then succeeds."""
    worker = await start_worker()
    key = await playbook(
        {"op": "do", "name": "a", "fail_times": 1, "retries": {"limit": 1, "delay_ms": 60_000}},
        {"op": "do", "name": "b"},
    )
    for _ in range(200):
        detail = await store.detail(key)
        if detail is not None and detail.attempts:
            break
        await asyncio.sleep(0.05)
    await control.pause(key)
    await bring_timer_forward(store, key)
    await _timer_checks(worker, 2)
    assert await status_of(store, key) is InstanceStatus.PAUSED
    await control.resume(key)
    out = output(await finished(store, key))
    assert out == {"a": {"step": "a", "attempt": 2}, "b": {"step": "b", "attempt": 1}}


async def test_terminate_cancels_timers_and_refuses_later_events(
    settings, topology, broker, store, control, start_worker, playbook
):
    await start_worker()
    sleeper = await playbook({"op": "sleep", "name": "s", "ms": WEEK_MS})
    waiter = await playbook({"op": "wait", "name": "w", "type": "go", "timeout_ms": 60_000})
    await reached(store, sleeper, InstanceStatus.SLEEPING)
    await reached(store, waiter, InstanceStatus.WAITING)
    for key in (sleeper, waiter):
        await control.terminate(key)
        detail = await store.detail(key)
        assert detail is not None
        assert detail.record.status is InstanceStatus.TERMINATED
        assert detail.record.waiting is None
    await send_event(settings, topology, waiter, "go", None, "go-late")
    letter = await dead_letter_of(store, waiter.instance_id)
    assert letter.reason == "instance-finished"
    with pytest.raises(ControlError, match="terminated and cannot be paused"):
        await control.pause(sleeper)


async def test_terminate_with_rollback_runs_compensations_in_reverse(
    store, control, start_worker, playbook
):
    await start_worker()
    key = await playbook(
        {"op": "do", "name": "a", "rollback": True},
        {"op": "do", "name": "b", "rollback": True},
        {"op": "sleep", "name": "s", "ms": WEEK_MS},
    )
    await reached(store, key, InstanceStatus.SLEEPING)
    await control.terminate(key, rollback=True)
    detail = await finished(store, key)
    assert detail.record.status is InstanceStatus.TERMINATED
    compensated = [(e.name, e.value) for e in detail.journal if e.kind is EntryKind.COMPENSATED]
    assert compensated == [("b", '{"undone":"b"}'), ("a", '{"undone":"a"}')]


async def test_failure_runs_compensations_then_errors(store, start_worker, playbook):
    await start_worker()
    key = await playbook(
        {"op": "do", "name": "a", "rollback": True},
        {"op": "do", "name": "b", "rollback": True, "sensitive": True},
        {"op": "fail", "message": "out of luck"},
    )
    detail = await finished(store, key)
    assert detail.record.status is InstanceStatus.ERRORED
    assert detail.record.error == "workflow failed: out of luck"
    assert [e.name for e in detail.journal if e.kind is EntryKind.COMPENSATED] == ["b", "a"]
    sensitive = [e for e in detail.journal if e.name == "b"]
    assert all(e.shown_value == REDACTED for e in sensitive)


async def test_restart_from_the_beginning_and_from_a_named_step(
    store, control, start_worker, playbook
):
    await start_worker()
    key = await playbook(
        {"op": "do", "name": "a"},
        {"op": "do", "name": "b"},
        {"op": "wait", "name": "w", "type": "go", "timeout_ms": 60_000},
    )
    before = await reached(store, key, InstanceStatus.WAITING)
    await control.restart(key, from_step="b")
    again = await reached(store, key, InstanceStatus.WAITING)
    assert again.record.generation == 1
    assert again.journal[0] == before.journal[0]  # kept as it was
    assert again.journal[1].started_at != before.journal[1].started_at  # ran again
    await control.restart(key)
    fresh = await reached(store, key, InstanceStatus.WAITING)
    assert fresh.record.generation == 2
    assert all(e.started_at != before.journal[0].started_at for e in fresh.journal)
    with pytest.raises(ControlError, match="no step named 'nope'"):
        await control.restart(key, from_step="nope")


async def test_delete_only_finished_instances(store, control, start_worker, playbook):
    await start_worker()
    sleeper = await playbook({"op": "sleep", "name": "s", "ms": WEEK_MS})
    done = await playbook({"op": "do", "name": "a"})
    await reached(store, sleeper, InstanceStatus.SLEEPING)
    with pytest.raises(ControlError, match="terminate it first"):
        await control.delete(sleeper)
    await finished(store, done)
    await control.delete(done)
    assert await store.detail(done) is None


# -- limits ------------------------------------------------------------------------------


async def test_each_limit_is_refused_with_its_message(
    settings, topology, broker, store, start_worker, playbook
):
    await start_worker(max_steps=3, max_sleep_seconds=60, value_bytes=2048)
    too_many = await playbook(*({"op": "do", "name": f"s{i}"} for i in range(5)))
    too_long = await playbook({"op": "sleep", "name": "nap", "ms": 120_000})
    bad_config = await playbook({"op": "do", "name": "a", "retries": {"limit": 5000}})
    expectations = {
        too_many: "the instance reached its limit of 3 journal entries",
        too_long: "sleep 'nap' of 120000 ms is over the limit of 60000 ms",
        bad_config: "step 'a' config: retries.limit is 5000, allowed 0 to 1000",
    }
    for key, message in expectations.items():
        detail = await finished(store, key)
        assert detail.record.status is InstanceStatus.ERRORED
        assert message in (detail.record.error or "")

    big = await playbook({"op": "do", "name": "x" * 10, "padding": "y" * 3000})
    letter = await dead_letter_of(store, big.instance_id)
    assert letter.reason == "over-limit"
    assert "params are" in letter.detail
    assert "the limit is 2048" in letter.detail
    assert await store.detail(big) is None


async def test_event_payload_over_the_limit_is_refused(
    settings, topology, broker, store, start_worker, playbook
):
    await start_worker(value_bytes=2048)
    key = await playbook({"op": "wait", "name": "w", "type": "go", "timeout_ms": 60_000})
    await reached(store, key, InstanceStatus.WAITING)
    await send_event(settings, topology, key, "go", "z" * 3000, "big-1")
    letter = await dead_letter_of(store, key.instance_id)
    assert letter.reason == "over-limit"
    assert "event payload are" in letter.detail


async def test_finished_instances_are_deleted_after_their_retention(
    settings, topology, store, start_worker, playbook_wasm
):
    """An instance created with a retention of 0 s is deleted once finished; the default keeps."""
    await start_worker(retention_check_seconds=0.2)
    digest = await push(store, "acme", playbook_wasm)
    params = {"ops": [{"op": "do", "name": "a"}]}
    short, kept = await create(
        settings,
        topology,
        CreateRequest("acme", digest, params, new_id("short"), retention_seconds=0),
        CreateRequest("acme", digest, params, new_id("kept")),
    )
    kept_detail = await finished(store, InstanceKey("acme", kept))
    assert kept_detail.record.retain_until is not None
    assert kept_detail.record.finished_at is not None
    days = (kept_detail.record.retain_until - kept_detail.record.finished_at).days
    assert days == settings.retention_days
    for _ in range(100):
        if await store.detail(InstanceKey("acme", short)) is None:
            break
        await asyncio.sleep(0.1)
    assert await store.detail(InstanceKey("acme", short)) is None
    assert await store.detail(InstanceKey("acme", kept)) is not None
