"""The fleet end to end over the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from stepfleet.broker import Outgoing, Topology
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import EntryKind, InstanceKey, InstanceStatus, digest_of
from stepfleet.store import LetterFilter, PgStore
from tests.conftest import ORDER_OUTPUT, ORDER_PARAMS, capture_logs, hostile_wasm
from tests.integration.conftest import wait_for_log, wait_for_status

pytestmark = pytest.mark.services

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED}


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


async def push(store: PgStore, tenant: str, wasm: bytes) -> str:
    digest = digest_of(wasm)
    await store.put_module(tenant, digest, wasm)
    return digest


async def create(settings, topology: Topology, *requests: CreateRequest) -> list[str]:
    async with Producer(settings.amqp_url, topology) as producer:
        return await producer.create_batch(list(requests))


async def archived(store: PgStore, instance_ids: list[str], timeout: float = 15.0):
    """Wait until the workers archived a dead letter for each instance id; return them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        letters = {}
        for instance_id in instance_ids:
            found = await store.dead_letters.find(LetterFilter(instance_id=instance_id))
            if found:
                letters[instance_id] = found[-1]
        if len(letters) == len(instance_ids):
            return [letters[i] for i in instance_ids]
        if loop.time() > deadline:
            missing = set(instance_ids) - set(letters)
            raise AssertionError(f"no archived dead letter for {missing} within {timeout}s")
        await asyncio.sleep(0.1)


async def dead_letter_of(store: PgStore, instance_id: str, timeout: float = 15.0):
    """The archived dead letter of one instance id."""
    [letter] = await archived(store, [instance_id], timeout)
    return letter


async def test_c_example_completes_with_its_output(
    settings, topology, store, start_worker, order_wasm
):
    """The C order workflow runs its three steps and completes with the expected output."""
    digest = await push(store, "acme", order_wasm)
    await start_worker()
    [instance_id] = await create(
        settings, topology, CreateRequest("acme", digest, ORDER_PARAMS, new_id("order"))
    )
    record, _ = await wait_for_status(store, InstanceKey("acme", instance_id), FINAL)
    assert record.status is InstanceStatus.COMPLETE, record.error
    assert json.loads(record.output) == ORDER_OUTPUT
    entries = await store.journal(InstanceKey("acme", instance_id))
    assert [e.name for e in entries] == ["reserve", "charge", "ship"]
    assert all(e.kind is EntryKind.STEP_SUCCEEDED and e.attempt == 1 for e in entries)


async def test_assemblyscript_example_completes(
    settings, topology, store, start_worker, greeter_wasm
):
    """The AssemblyScript greeter runs for a second tenant and completes."""
    digest = await push(store, "globex", greeter_wasm)
    await start_worker()
    [instance_id] = await create(
        settings,
        topology,
        CreateRequest("globex", digest, {"name": "Ada", "lang": "en"}, new_id("greet")),
    )
    record, _ = await wait_for_status(store, InstanceKey("globex", instance_id), FINAL)
    assert record.status is InstanceStatus.COMPLETE, record.error
    entries = await store.journal(InstanceKey("globex", instance_id))
    assert len(entries) >= 3
    assert "Ada" in record.output


async def test_guest_failure_errors_the_instance(
    settings, topology, store, start_worker, order_wasm
):
    """A step that fails for good is journaled and the program's failure errors the instance."""
    digest = await push(store, "acme", order_wasm)
    await start_worker()
    params = {**ORDER_PARAMS, "fail_at": "charge"}
    [instance_id] = await create(
        settings, topology, CreateRequest("acme", digest, params, new_id("fail"))
    )
    record, _ = await wait_for_status(store, InstanceKey("acme", instance_id), FINAL)
    assert record.status is InstanceStatus.ERRORED
    assert "workflow failed" in record.error
    entries = await store.journal(InstanceKey("acme", instance_id))
    assert [(e.name, e.kind) for e in entries] == [
        ("reserve", EntryKind.STEP_SUCCEEDED),
        ("charge", EntryKind.STEP_FAILED),
        ("reserve", EntryKind.COMPENSATED),  # reserve's rollback released the stock
    ]


async def test_same_create_twice_yields_one_instance(
    settings, topology, store, start_worker, order_wasm
):
    """Publishing one create twice runs one instance with each step journaled once."""
    digest = await push(store, "acme", order_wasm)
    instance_id = new_id("twice")
    request = CreateRequest("acme", digest, ORDER_PARAMS, instance_id)
    await create(settings, topology, request, request)
    with capture_logs() as logs:
        await start_worker()
        await create(settings, topology, request)
        record, _ = await wait_for_status(store, InstanceKey("acme", instance_id), FINAL)
        assert record.status is InstanceStatus.COMPLETE
        # Of the three creates, one made the instance; both others (the late one too) are
        # handled only once they are logged as ignored.
        await wait_for_log(
            logs, "duplicate_ignored", count=2, tenant="acme", instance=instance_id, kind="create"
        )
    entries = await store.journal(InstanceKey("acme", instance_id))
    assert [e.seq for e in entries] == [0, 1, 2]
    assert len(await store.find_instances(instance_id, "acme")) == 1


async def test_redelivered_step_message_does_no_harm(
    settings, topology, broker, store, start_worker, order_wasm
):
    """A stale step message (as after a crash before ack) is acknowledged without effect."""
    digest = await push(store, "acme", order_wasm)
    await start_worker()
    [instance_id] = await create(
        settings, topology, CreateRequest("acme", digest, ORDER_PARAMS, new_id("stale"))
    )
    key = InstanceKey("acme", instance_id)
    await wait_for_status(store, key, FINAL)
    headers = {
        "x-tenant": "acme",
        "x-instance-id": instance_id,
        "x-module": digest,
        "x-kind": "step",
        "x-schema-version": "1",
    }
    stale = [
        Outgoing(
            topology.internal_exchange, "acme.step", b'{"version":1,"position":%d}' % p, headers
        )
        for p in (1, 2, 3)
    ]
    with capture_logs() as logs:
        await broker.publish_many(stale)
        # Each stale message is handled once it is logged as ignored.
        await wait_for_log(
            logs, "duplicate_ignored", count=len(stale), instance=instance_id, kind="step"
        )
    record, _ = await wait_for_status(store, key, FINAL)
    assert record.status is InstanceStatus.COMPLETE
    assert [e.seq for e in await store.journal(key)] == [0, 1, 2]


async def test_two_workers_share_the_load(settings, topology, store, start_worker, order_wasm):
    """With two workers consuming, both run steps and every workflow completes."""
    digest = await push(store, "acme", order_wasm)
    first = await start_worker("w1", batch_size=4, concurrency=1)
    second = await start_worker("w2", batch_size=4, concurrency=1)
    requests = [
        CreateRequest("acme", digest, {**ORDER_PARAMS, "order_id": f"S-{i}"}, new_id("share"))
        for i in range(60)
    ]
    ids = await create(settings, topology, *requests)
    for instance_id in ids:
        record, _ = await wait_for_status(
            store, InstanceKey("acme", instance_id), FINAL, timeout=60
        )
        assert record.status is InstanceStatus.COMPLETE, record.error
    assert first.steps_done > 0
    assert second.steps_done > 0
    assert first.steps_done + second.steps_done >= 60 * 4


@pytest.mark.parametrize(
    ("module", "expected"),
    [("loop", "CPU limit exceeded"), ("membomb", "memory limit exceeded")],
)
async def test_hostile_guest_fails_its_step_and_the_worker_serves_on(
    settings, topology, store, start_worker, order_wasm, module, expected
):
    """A guest that loops forever or allocates without bound errors; other workflows complete."""
    hostile = await push(store, "mallory", hostile_wasm(module))
    digest = await push(store, "acme", order_wasm)
    await start_worker()
    bad_id, good_id = new_id(module), new_id("good")
    await create(
        settings,
        topology,
        CreateRequest("mallory", hostile, {}, bad_id),
        CreateRequest("acme", digest, ORDER_PARAMS, good_id),
    )
    bad, _ = await wait_for_status(store, InstanceKey("mallory", bad_id), FINAL, timeout=60)
    assert bad.status is InstanceStatus.ERRORED
    assert expected in bad.error
    good, _ = await wait_for_status(store, InstanceKey("acme", good_id), FINAL, timeout=60)
    assert good.status is InstanceStatus.COMPLETE


async def test_invalid_messages_are_dead_lettered_and_the_worker_keeps_running(
    settings, topology, broker, store, start_worker, order_wasm
):
    """Bad JSON, a missing header and an unknown module each land in the DLQ with a reason."""
    digest = await push(store, "acme", order_wasm)
    await start_worker()
    base = {
        "x-tenant": "acme",
        "x-module": digest,
        "x-kind": "create",
        "x-schema-version": "1",
    }
    unknown_module = "sha256:" + "0" * 64
    bad = [
        Outgoing(
            topology.ingress_exchange,
            "acme.create",
            b"{not json",
            {**base, "x-instance-id": new_id("badjson")},
        ),
        Outgoing(
            topology.ingress_exchange,
            "acme.create",
            b'{"params":{}}',
            {k: v for k, v in base.items() if k != "x-kind"} | {"x-instance-id": new_id("nokind")},
        ),
        Outgoing(
            topology.ingress_exchange,
            "acme.create",
            b'{"params":{}}',
            {**base, "x-module": unknown_module, "x-instance-id": new_id("nomod")},
            user_id="guest",
        ),
    ]
    await broker.publish_many(bad)
    ids = [message.headers["x-instance-id"] for message in bad]
    letters = await archived(store, ids)
    reasons = {letter.reason for letter in letters}
    assert reasons == {"bad-body", "missing-header", "unknown-module"}
    by_reason = {letter.reason: letter for letter in letters}
    assert by_reason["bad-body"].body == b"{not json"
    assert by_reason["unknown-module"].headers["x-module"] == unknown_module
    assert "was never pushed" in by_reason["unknown-module"].detail
    # The worker is still serving.
    [instance_id] = await create(
        settings, topology, CreateRequest("acme", digest, ORDER_PARAMS, new_id("after"))
    )
    record, _ = await wait_for_status(store, InstanceKey("acme", instance_id), FINAL)
    assert record.status is InstanceStatus.COMPLETE


async def test_a_batch_that_fails_unexpectedly_is_handed_back_and_completes(
    settings, topology, store, start_worker, order_wasm
):
    """A worker bug in one batch releases its deliveries; they come back and the workflow ends."""
    digest = await push(store, "acme", order_wasm)
    worker = await start_worker(concurrency=1)
    processor = worker._processor
    real = processor.process
    failures = []

    async def flaky(deliveries):
        if not failures:
            failures.append(len(deliveries))
            raise RuntimeError("injected failure")
        return await real(deliveries)

    processor.process = flaky  # type: ignore[method-assign]
    [instance_id] = await create(
        settings, topology, CreateRequest("acme", digest, ORDER_PARAMS, new_id("flaky"))
    )
    record, _ = await wait_for_status(store, InstanceKey("acme", instance_id), FINAL)
    assert failures
    assert record.status is InstanceStatus.COMPLETE
    assert [e.seq for e in await store.journal(InstanceKey("acme", instance_id))] == [0, 1, 2]


async def test_a_worker_whose_run_is_cancelled_leaves_no_task_running(settings):
    """Cancelling `Worker.run` (a caller that gave up waiting for its drain) ends its pipelines
    and background loops too: left running on closed connections, they claimed timers."""
    from stepfleet.workers.worker import Worker

    before = asyncio.all_tasks()
    worker = Worker(settings, name="cancelled")
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 10)
    own = asyncio.all_tasks() - before - {run}
    assert {t.get_name() for t in own} >= {"timers", "outbox-relay", "pipeline-0"}
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert [t.get_name() for t in own if not t.done()] == []
