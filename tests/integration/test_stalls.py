"""No live instance is left with nothing to move it: a step dead-lettered at its delivery
limit marks its instance stalled (shown by status, list and dlq list) until the letter is
replayed; a step message lost from its queue is found by the stall sweep and published
again; the sweep never journals a step twice, even with several workers and copies of the
message still queued."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from stepfleet.broker import Broker, Outgoing, Topology
from stepfleet.cli.main import app
from stepfleet.client import CreateRequest, Producer
from stepfleet.control import DeadLetters
from stepfleet.cycle.messages import DEAD_LETTER_ID, step_message
from stepfleet.engine import due_us
from stepfleet.schemas import InstanceKey, InstanceStatus, digest_of
from stepfleet.store import InstanceRecord, LetterFilter
from stepfleet.workers.sweep import StallSweep
from tests.conftest import capture_logs
from tests.integration.conftest import logged, wait_for_status, wait_until
from tests.integration.test_faults import spawn, worker_env

pytestmark = pytest.mark.services

DO_TWO = ({"op": "do", "name": "a"}, {"op": "do", "name": "b"})


@pytest.fixture
def cli(settings):
    env = {
        "STEPFLEET_DATABASE_URL": settings.database_url,
        "STEPFLEET_AMQP_URL": settings.amqp_url,
        "STEPFLEET_PREFIX": settings.prefix,
        "STEPFLEET_OPERATOR": "oncall-ada",
    }
    runner = CliRunner()

    async def invoke(*args: str):
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)

    return invoke


@pytest.fixture
async def lanes(settings) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A channel of the test's own, to reach into the work queues by hand."""
    connection = await aiormq.connect(settings.amqp_url)
    yield await connection.channel()
    await connection.close()


async def stopped(worker) -> None:
    """Stop a worker and wait until it consumes nothing any more."""
    worker.stop()
    await wait_until(lambda: worker.health.state == "stopped", "the worker stopping", 30)


async def record_of(store, key: InstanceKey) -> InstanceRecord:
    [(record, _)] = await store.find_instances(key.instance_id, key.tenant)
    return record


async def stalled(store, key: InstanceKey) -> InstanceRecord:
    """Wait until the instance is marked stalled; return it."""
    await wait_until(
        lambda: _is_stalled(store, key), f"{key.instance_id} marked stalled", timeout=30
    )
    return await record_of(store, key)


async def _is_stalled(store, key: InstanceKey) -> bool:
    return (await record_of(store, key)).stalled is not None


async def bounce_to_the_delivery_limit(channel, topology, raw, message_id: str) -> None:
    """Hand every delivery of the lanes back (nack with requeue) until RabbitMQ dead-letters
    the message at its queue's delivery limit, as it does with a step that kills every worker
    that takes it."""

    async def bounce(message: aiormq.abc.DeliveredMessage) -> None:
        await channel.basic_nack(message.delivery_tag, requeue=True)

    tags = [
        (await channel.basic_consume(queue, bounce, no_ack=False)).consumer_tag
        for queue in topology.work_queues
    ]
    try:
        letter = await raw.dead_letter(message_id, timeout=30)
    finally:
        for tag in tags:
            await channel.basic_cancel(tag)
    deaths = letter.header.properties.headers["x-death"]
    assert deaths[0]["reason"] == "delivery_limit", deaths


async def journal_report(store, tenant: str) -> dict[str, int]:
    async with store._engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    """
                    SELECT
                      (SELECT count(*) FROM instances WHERE tenant = :t AND status = 'complete')
                        AS complete,
                      (SELECT count(*) FROM journal WHERE tenant = :t) AS entries,
                      (SELECT count(*) FROM (
                          SELECT instance_id, name FROM journal WHERE tenant = :t
                          GROUP BY instance_id, name HAVING count(*) > 1) AS twice)
                        AS repeated_steps
                    """
                ),
                {"t": tenant},
            )
        ).one()
    return dict(row._mapping)


async def test_a_step_dead_lettered_at_its_delivery_limit_stalls_its_instance_until_replayed(
    cli, settings, topology, store, control, raw, lanes, start_worker, playbook
):
    """RabbitMQ dead-letters a running instance's only step message at its delivery limit:
    the archiver marks the instance stalled with the letter and its reason, status, list
    --stalled and dlq list --stalled show it, and replaying the letter completes the
    instance and clears the mark."""
    first = await start_worker(local_steps=0)
    key = await playbook(*DO_TWO, label="limit")
    await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    await stopped(first)
    # The restart queues the instance's one step message, at position 0 of generation 1.
    await control.restart(key)
    await bounce_to_the_delivery_limit(
        lanes, topology, raw, f"{key.tenant}/{key.instance_id}/step/0"
    )
    with capture_logs() as logs:
        await start_worker(local_steps=0)
        record = await stalled(store, key)
    [letter] = await store.dead_letters.find(LetterFilter(instance_id=key.instance_id))
    assert letter.reason == "delivery-limit"
    assert record.status is InstanceStatus.RUNNING
    assert record.stalled is not None
    assert (record.stalled.letter_id, record.stalled.reason) == (letter.id, "delivery-limit")
    [log] = logged(logs, "instance_stalled", instance=key.instance_id)
    assert (log["tenant"], log["module_digest"], log["position"]) == (
        key.tenant,
        record.module,
        0,
    )

    status = json.loads((await cli("status", key.instance_id, "--json")).stdout)
    assert status["status"] == "running"
    assert status["stalled"]["letter"] == letter.id
    assert status["stalled"]["reason"] == "delivery-limit"
    text_status = (await cli("status", key.instance_id)).stdout
    assert f"stalled   dead letter {letter.id} (delivery-limit)" in text_status
    listed = await cli("list", "--tenant", key.tenant, "--stalled", "--json")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [key.instance_id]
    letters = await cli("dlq", "list", "--stalled", "--tenant", key.tenant, "--json")
    assert [json.loads(line)["id"] for line in letters.stdout.splitlines()] == [letter.id]

    replayed = await cli("dlq", "replay", str(letter.id))
    assert replayed.exit_code == 0, replayed.output
    await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    done = await record_of(store, key)
    assert done.stalled is None
    assert (await store.journal(key))[-1].name == "b"
    assert (await cli("list", "--tenant", key.tenant, "--stalled")).stdout == ""
    assert (await cli("dlq", "list", "--stalled", "--tenant", key.tenant, "--json")).stdout == ""


async def test_only_a_letter_for_where_the_instance_stands_marks_it(
    settings, topology, broker, store, control, start_worker, playbook
):
    """Dead letters the fleet sent for a sleeping instance: a step (it sleeps), a wake of an
    earlier timer and one of an earlier attempt are stale and mark nothing, nor does a letter
    for a finished instance; the wake of its current timer marks it. Pausing the instance
    keeps the mark, terminating it clears the mark."""
    await start_worker()
    sleeper = await playbook({"op": "sleep", "name": "nap", "ms": 3_600_000}, label="nap")
    done = await playbook(*DO_TWO, label="done")
    asleep, _ = await wait_for_status(store, sleeper, {InstanceStatus.SLEEPING})
    finished, _ = await wait_for_status(store, done, {InstanceStatus.COMPLETE})
    assert isinstance(asleep, InstanceRecord)
    assert asleep.waiting is not None
    due = due_us(asleep.waiting.wake_at)
    wake = {"version": 1, "position": asleep.position, "attempt": asleep.attempt, "due_us": due}

    def letter(key: InstanceKey, kind: str, body: dict[str, Any]) -> Outgoing:
        """A dead letter as a worker sends one for a message of the internal exchange."""
        return Outgoing(
            topology.dead_letter_exchange,
            f"{key.tenant}.{kind}",
            json.dumps(body).encode(),
            {
                "x-tenant": key.tenant,
                "x-instance-id": key.instance_id,
                "x-kind": kind,
                "x-schema-version": "1",
                DEAD_LETTER_ID: str(uuid.uuid4()),
                "x-dead-reason": "unprocessable",
                "x-dead-detail": "RuntimeError: a host bug",
                "x-original-exchange": topology.internal_exchange,
                "x-original-routing-key": f"{key.tenant}.{kind}",
                "x-original-user-id": "guest",
            },
        )

    stale = [
        letter(sleeper, "step", {"version": 1, "position": asleep.position}),
        letter(sleeper, "wake", {**wake, "due_us": due - 1}),
        letter(sleeper, "wake", {**wake, "attempt": asleep.attempt + 1}),
        letter(done, "step", {"version": 1, "position": finished.position}),
    ]
    await broker.publish_many(stale)
    await wait_until(
        lambda: _count_letters(store, [sleeper, done], 4), "the stale letters archived"
    )
    assert (await record_of(store, sleeper)).stalled is None
    assert (await record_of(store, done)).stalled is None

    await broker.publish_many([letter(sleeper, "wake", wake)])
    record = await stalled(store, sleeper)
    assert record.stalled is not None
    assert record.stalled.reason == "unprocessable"
    assert record.status is InstanceStatus.SLEEPING

    await control.pause(sleeper)
    assert (await record_of(store, sleeper)).stalled == record.stalled  # a pause keeps it
    await control.terminate(sleeper)
    assert (await record_of(store, sleeper)).stalled is None


async def _count_letters(store, keys: list[InstanceKey], count: int) -> bool:
    found = 0
    for key in keys:
        found += len(await store.dead_letters.find(LetterFilter(instance_id=key.instance_id)))
    return found >= count


async def test_an_instance_whose_step_message_was_lost_is_found_by_the_sweep(
    topology, store, control, lanes, start_worker, playbook
):
    """A running instance's only step message is purged from its queue: the stall sweep
    finds the instance (no timer, no outbox row, no progress), logs it with its context,
    publishes its step again, counts it in the worker's health, and the instance
    completes."""
    first = await start_worker(local_steps=0)
    key = await playbook(*DO_TWO, label="lost")
    await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    await stopped(first)
    await control.restart(key)
    purged = 0
    for queue in topology.work_queues:
        purged += (await lanes.queue_purge(queue)).message_count
    assert purged >= 1
    with capture_logs() as logs:
        worker = await start_worker(
            local_steps=0, stall_after_seconds=1.0, outbox_relay_after_seconds=0.5
        )
        await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    [log] = logged(logs, "instance_unmoved_step_republished", instance=key.instance_id)
    record = await record_of(store, key)
    assert (log["tenant"], log["module_digest"], log["position"], log["generation"]) == (
        key.tenant,
        record.module,
        0,
        1,
    )
    assert [entry.name for entry in await store.journal(key)] == ["a", "b"]
    assert worker.sweep.swept >= 1
    await wait_until(lambda: worker.health.stalls_swept >= 1, "the sweep counted in health")


async def test_the_sweep_never_journals_a_step_twice_under_concurrent_workers(
    topology, broker, store, control, lanes, start_worker, playbook
):
    """Forty instances restarted with no worker running; their step messages are purged,
    and copies are published again for half of them. Two sweeps at once publish each
    instance's step once (so half of them have two step messages queued), then two workers
    sweeping every half second (one at a time) consume: every instance completes with each
    step journaled once."""
    first = await start_worker(local_steps=0)
    tenant = f"sweep{uuid.uuid4().hex[:8]}"
    ops = (*DO_TWO, {"op": "do", "name": "c"})
    keys = [await playbook(*ops, label=f"s{i}", tenant=tenant) for i in range(40)]
    for key in keys:
        await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    await stopped(first)
    for key in keys:
        await control.restart(key)
    for queue in topology.work_queues:
        await lanes.queue_purge(queue)
    copies = []
    for key in keys[:20]:
        record = await record_of(store, key)
        copies.append(step_message(topology, key, record.module, 0, record.generation)[1])
    await broker.publish_many(copies)
    await asyncio.sleep(1.2)  # older than the sweep's threshold: every one is a candidate
    # Two sweeps at once before any worker consumes: one at a time, each instance once, so
    # the twenty with a copy still queued now have two step messages.
    sweeps = [
        StallSweep(store, topology, broker.publish_many, stall_after_seconds=1.0, every_seconds=1)
        for _ in range(2)
    ]
    first_pass = await asyncio.gather(*(sweep.sweep() for sweep in sweeps))
    assert sum(first_pass) == len(keys), first_pass
    workers = [
        await start_worker(name=f"w{i}", stall_after_seconds=1.0, outbox_relay_after_seconds=0.5)
        for i in range(2)
    ]

    async def all_complete() -> bool:
        return (await journal_report(store, tenant))["complete"] == len(keys)

    await wait_until(all_complete, "every instance completing", timeout=60)
    report = await journal_report(store, tenant)
    swept = [worker.sweep.swept for worker in workers]
    print(
        "\nsweep under two workers:",
        json.dumps({**report, "first_pass": first_pass, "swept_per_worker": swept}),
    )
    assert report == {"complete": 40, "entries": 120, "repeated_steps": 0}


@pytest.mark.timeout(240)
async def test_a_step_that_kills_every_worker_stalls_its_instance_until_replayed(
    settings, store, start_worker, playbook_wasm, tmp_path
):
    """Worker processes die (SIGKILL) before the transaction of any batch that holds a step
    message (crash point `step-before-commit`) and are restarted by a supervisor, until
    RabbitMQ dead-letters the step at its delivery limit (2 here): a restarted worker archives
    the letter and marks the instance stalled. A replay, by a worker without the crash point,
    completes it and clears the mark."""
    topology = Topology(f"{settings.prefix}-crash", 2, settings.lanes)
    health = tmp_path / "worker.health"
    env = worker_env(
        settings,
        STEPFLEET_PREFIX=topology.prefix,
        STEPFLEET_DELIVERY_LIMIT="2",
        STEPFLEET_LOCAL_STEPS="0",
        STEPFLEET_CRASH_POINTS="step-before-commit:1",
        STEPFLEET_HEALTH_FILE=str(health),
    )
    log = tmp_path / "workers.log"
    tenant = f"crash{uuid.uuid4().hex[:8]}"
    digest = digest_of(playbook_wasm)
    await store.put_module(tenant, digest, playbook_wasm)
    key = InstanceKey(tenant, f"poison-{uuid.uuid4().hex[:8]}")
    worker = spawn(env, log)
    restarts = 0
    try:
        await wait_until(health.exists, "the first worker ready", timeout=60)
        async with Producer(settings.amqp_url, topology) as producer:
            await producer.create(
                CreateRequest(tenant, digest, {"ops": list(DO_TWO)}, key.instance_id)
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 150
        while not (await _exists(store, key) and await _is_stalled(store, key)):
            assert loop.time() < deadline, f"not stalled after {restarts} restarts"
            if worker.poll() is not None:
                worker = spawn(env, log)
                restarts += 1
            await asyncio.sleep(0.2)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        await asyncio.to_thread(worker.wait, 60)
    crashes = log.read_text(errors="replace").count("stepfleet: crash point step-before-commit")
    record = await record_of(store, key)
    assert record.stalled is not None
    assert record.stalled.reason == "delivery-limit"
    assert (record.status, record.position) == (InstanceStatus.RUNNING, 1)
    assert crashes >= 2
    print("\ncrash loop:", json.dumps({"crashes": crashes, "worker_restarts": restarts}))

    fleet = Broker(settings.amqp_url, topology)
    await fleet.connect(name="stepfleet-tests-crash")
    try:
        await start_worker(prefix=topology.prefix, delivery_limit=2, local_steps=0)
        replay = DeadLetters(store, fleet, topology, user_id=settings.broker_user)
        outcome = await replay.replay(LetterFilter(stalled=True, instance_id=key.instance_id))
        assert outcome.done == [record.stalled.letter_id]
        await wait_for_status(store, key, {InstanceStatus.COMPLETE})
        assert (await record_of(store, key)).stalled is None
        assert [e.name for e in await store.journal(key)] == ["a", "b"]
    finally:
        await fleet.delete_topology()
        await fleet.close()


async def _exists(store, key: InstanceKey) -> bool:
    return bool(await store.find_instances(key.instance_id, key.tenant))
