"""Fair sharing between tenants: lanes keep a flood to its tenant, and per-tenant running-step
and rate limits hold across workers."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from stepfleet.broker import Broker, Outgoing, Topology
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import InstanceKey, InstanceStatus, TenantLimits, WaitKind, digest_of
from stepfleet.workers import Worker
from stepfleet.workers.event_loop import URGENT
from stepfleet.workers.placement import home_side_lane
from tests.integration.conftest import wait_for_status, wait_until

pytestmark = pytest.mark.services

ONE_STEP = [{"op": "do", "name": "a"}]


def tenant_name(label: str) -> str:
    return f"{label}{uuid.uuid4().hex[:8]}"


async def publish_probe(broker: Broker, topology: Topology, tenant: str, kind: str) -> str:
    """Publish an empty message of `kind` for `tenant` the way producers or workers do; its id."""
    probe = uuid.uuid4().hex
    internal = kind in ("step", "wake")
    await broker.publish_many(
        [
            Outgoing(
                topology.internal_exchange if internal else topology.ingress_exchange,
                f"{tenant}.{kind}",
                b"{}",
                {"x-tenant": tenant, "x-kind": kind},
                message_id=probe,
                user_id=None if internal else "guest",
            )
        ]
    )
    return probe


async def lane_of(broker: Broker, topology: Topology, tenant: str, kind: str = "create") -> int:
    """Which work queue a tenant's messages of one kind land in (no worker may be running)."""
    probe = await publish_probe(broker, topology, tenant, kind)
    for _ in range(50):
        for lane, queue in enumerate(topology.work_queues):
            for delivery in await broker.fetch(queue, limit=100):
                await delivery.ack()
                if delivery.message_id == probe:
                    return lane
        await asyncio.sleep(0.05)
    raise AssertionError(f"probe for {tenant} not found in any lane")


async def lanes_of(broker: Broker, topology: Topology, tenant: str) -> set[int]:
    """The lanes a tenant's creates and steps land in (placed by routing key)."""
    return {await lane_of(broker, topology, tenant, kind) for kind in ("create", "step")}


async def test_a_flooding_tenant_does_not_hold_up_another(
    settings, topology, broker, store, start_worker, playbook_wasm
):
    """While tenant A's flood is still queued, tenant B's workflows complete."""
    flooder = tenant_name("flood")
    lanes = await lanes_of(broker, topology, flooder)
    other = tenant_name("calm")
    while await lanes_of(broker, topology, other) & lanes:
        other = tenant_name("calm")
    digest = digest_of(playbook_wasm)
    for tenant in (flooder, other):
        await store.put_module(tenant, digest, playbook_wasm)
    params = {"ops": [{"op": "do", "name": name} for name in ("a", "b", "c")]}
    async with Producer(settings.amqp_url, topology) as producer:
        flood = [
            CreateRequest(flooder, digest, params, f"f-{i}-{uuid.uuid4().hex[:6]}")
            for i in range(1500)
        ]
        for offset in range(0, len(flood), 500):
            await producer.create_batch(flood[offset : offset + 500])
        calm = await producer.create_batch(
            [CreateRequest(other, digest, params, f"c-{i}") for i in range(5)]
        )
    await start_worker()
    for instance_id in calm:
        await wait_for_status(store, InstanceKey(other, instance_id), {InstanceStatus.COMPLETE})
    async with store._engine.connect() as connection:
        done = (
            await connection.execute(
                text("SELECT count(*) FROM instances WHERE tenant = :t AND status = 'complete'"),
                {"t": flooder},
            )
        ).scalar_one()
    assert done < len(flood), "the flood was finished before the other tenant was served"
    # Let the flood drain, so later tests start with empty lanes.
    for _ in range(1200):
        async with store._engine.connect() as connection:
            drained = (
                await connection.execute(
                    text(
                        "SELECT count(*) FROM instances WHERE tenant = :t AND status = 'complete'"
                    ),
                    {"t": flooder},
                )
            ).scalar_one()
        if drained == len(flood):
            break
        await asyncio.sleep(0.05)
    assert drained == len(flood)


async def count_complete(store, tenant: str) -> int:
    async with store._engine.connect() as connection:
        return (
            await connection.execute(
                text("SELECT count(*) FROM instances WHERE tenant = :t AND status = 'complete'"),
                {"t": tenant},
            )
        ).scalar_one()


async def sharing_a_create_lane(
    broker: Broker, topology: Topology, store: Any, wasm: bytes
) -> tuple[str, str, str]:
    """A flooding tenant and a calm one whose creates share a lane, both with `wasm` pushed;
    and its digest."""
    flooder = tenant_name("flood")
    lane = await lane_of(broker, topology, flooder)
    other = tenant_name("calm")
    while await lane_of(broker, topology, other) != lane:
        other = tenant_name("calm")
    digest = digest_of(wasm)
    for tenant in (flooder, other):
        await store.put_module(tenant, digest, wasm)
    return flooder, other, digest


async def test_a_flood_in_the_same_lane_is_moved_aside_for_another_tenant(
    settings, topology, broker, store, start_worker, playbook_wasm
):
    """Tenant B, which uses the lane too, has creates behind tenant A's flood in it; the
    worker moves A's deliveries to side lanes, reaches B's and completes B's workflows while
    A's flood is still queued, and then completes every one of A's too."""
    flooder, other, digest = await sharing_a_create_lane(broker, topology, store, playbook_wasm)
    params = {"ops": [{"op": "do", "name": name} for name in ("a", "b", "c")]}
    async with Producer(settings.amqp_url, topology) as producer:
        calm = await producer.create_batch([CreateRequest(other, digest, params, "c-first")])
        flood = [
            CreateRequest(flooder, digest, params, f"f-{i}-{uuid.uuid4().hex[:6]}")
            for i in range(2000)
        ]
        for offset in range(0, len(flood), 500):
            await producer.create_batch(flood[offset : offset + 500])
        calm += await producer.create_batch(
            [CreateRequest(other, digest, params, f"c-{i}") for i in range(5)]
        )
    worker = await start_worker()
    for instance_id in calm:  # order of completion is the point, not time: a long timeout
        await wait_for_status(
            store, InstanceKey(other, instance_id), {InstanceStatus.COMPLETE}, timeout=120
        )
    assert await count_complete(store, flooder) < len(flood), "B waited for all of A's flood"
    assert worker._side_lanes.moved > 0

    async def flood_done() -> bool:
        return await count_complete(store, flooder) == len(flood)

    await wait_until(flood_done, "the whole flood completing", timeout=180)


async def test_a_worker_places_and_moves_a_flood_from_urgent_tasks(
    settings, topology, broker, store, playbook_wasm
):
    """Binding a flooding tenant aside and moving its deliveries run ahead of the flood's own
    batches on the worker's loop (workers/event_loop.py): every binding and every move happens
    in an urgent context."""
    flooder, other, digest = await sharing_a_create_lane(broker, topology, store, playbook_wasm)
    async with Producer(settings.amqp_url, topology) as producer:
        await producer.create_batch([CreateRequest(other, digest, {"ops": ONE_STEP}, "c-0")])
        await producer.create_batch(
            [CreateRequest(flooder, digest, {"ops": ONE_STEP}, f"f-{i}") for i in range(300)]
        )
    worker = Worker(settings.model_copy(update={"tenant_backlog": 8}), name="urgent")
    bound: list[bool] = []
    moved: list[bool] = []
    bind, publish = worker._placement._place_aside, worker._side_lanes._publish

    async def binding(tenant: str, lane: int) -> None:
        bound.append(URGENT.get())
        await bind(tenant, lane)

    async def moving(messages: Sequence[Outgoing]) -> None:
        moved.append(URGENT.get())
        await publish(messages)

    worker._placement._place_aside = binding
    worker._side_lanes._publish = moving
    running = asyncio.create_task(worker.run())
    try:

        async def flood_done() -> bool:
            return await count_complete(store, flooder) == 300

        await wait_until(flood_done, "the flood completing", timeout=120)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
    assert bound, "the flood was never placed aside"
    assert moved, "nothing of the flood was moved out of the shared lane"
    assert all(bound), "a binding ran as an ordinary task"
    assert all(moved), "a move ran as an ordinary task"


async def test_a_tenant_flooding_a_running_fleet_is_placed_aside_at_the_broker(
    settings, topology, broker, store, start_worker, playbook_wasm
):
    """Once the worker sees tenant A flooding, RabbitMQ routes A's further creates and steps to
    A's side lane itself (no move needed), tenant B's creates in A's lane are reached while A's
    flood goes on, and every workflow of both completes."""
    flooder, other, digest = await sharing_a_create_lane(broker, topology, store, playbook_wasm)
    params = {"ops": [{"op": "do", "name": name} for name in ("a", "b", "c")]}
    worker = await start_worker()

    async def flood_done_when_calm_is(calm: list[str]) -> int:
        for instance_id in calm:  # order of completion is the point, not time: a long timeout
            await wait_for_status(
                store, InstanceKey(other, instance_id), {InstanceStatus.COMPLETE}, timeout=120
            )
        return await count_complete(store, flooder)

    async with Producer(settings.amqp_url, topology) as producer:
        flood = [
            CreateRequest(flooder, digest, params, f"f-{i}-{uuid.uuid4().hex[:6]}")
            for i in range(6000)
        ]
        for offset in range(0, len(flood), 250):
            await producer.create_batch(flood[offset : offset + 250])
            if offset == 1500:  # B's creates while A's flood is being published
                calm = await producer.create_batch(
                    [CreateRequest(other, digest, params, f"c-{i}") for i in range(5)]
                )
                calm_done = asyncio.create_task(flood_done_when_calm_is(calm))
    assert await calm_done < len(flood), "B waited for all of A's flood"

    async def flood_done() -> bool:
        return await count_complete(store, flooder) == len(flood)

    await wait_until(flood_done, "the whole flood completing", timeout=180)
    assert worker._side_lanes.placed > 0, "the broker routed none of A's messages aside"
    assert await count_complete(store, other) == len(calm)


async def test_weighted_tenants_share_a_worker_by_their_weights(
    settings, topology, store, start_worker, playbook_wasm
):
    """Two tenants flood at once, with weights 1 and 3: both progress, and the heavier one
    gets more steps done in the same window."""
    light, heavy = tenant_name("w1"), tenant_name("w3")
    # Tenants placed aside in the same side lane share its order, as tenants sharing a lane
    # do (docs/architecture.md): these two flood in side lanes of their own.
    while home_side_lane(heavy, topology.side_lanes) == home_side_lane(light, topology.side_lanes):
        heavy = tenant_name("w3")
    digest = digest_of(playbook_wasm)
    await store.tenants.add(heavy, None, TenantLimits(weight=3))
    for tenant in (light, heavy):
        await store.put_module(tenant, digest, playbook_wasm)
    params = {"ops": [{"op": "do", "name": name} for name in ("a", "b", "c", "d", "e", "f")]}
    async with Producer(settings.amqp_url, topology) as producer:
        for offset in range(0, 700, 100):  # both floods side by side, in every lane they use
            for tenant in (light, heavy):
                await producer.create_batch(
                    [CreateRequest(tenant, digest, params, f"{tenant}-{i}")
                     for i in range(offset, offset + 100)]
                )  # fmt: skip
    await start_worker()

    async def journal_rows(tenant: str) -> int:
        async with store._engine.connect() as connection:
            return (
                await connection.execute(
                    text("SELECT count(*) FROM journal WHERE tenant = :t"), {"t": tenant}
                )
            ).scalar_one()

    async def both_going() -> bool:
        return min(await journal_rows(heavy), await journal_rows(light)) >= 100

    await wait_until(both_going, "both tenants' steps running", timeout=120)
    before = {t: await journal_rows(t) for t in (light, heavy)}

    async def window_done() -> bool:
        done = [await journal_rows(t) - before[t] for t in (light, heavy)]
        return sum(done) >= 2000

    await wait_until(window_done, "2,000 more steps done", timeout=120)
    done_light = await journal_rows(light) - before[light]
    done_heavy = await journal_rows(heavy) - before[heavy]
    assert done_light > 0
    assert done_heavy > 1.5 * done_light, (done_heavy, done_light)

    async def all_done() -> bool:  # nothing of the floods is left for the next tests
        return await journal_rows(light) + await journal_rows(heavy) == 2 * 700 * 6

    await wait_until(all_done, "both floods done", timeout=120)


async def test_running_steps_cap_holds_across_workers(
    settings, store, start_worker, playbook, database_url
):
    """With every one of its slots held elsewhere, a tenant's steps wait (parked, not lost)
    while another tenant's run; freed slots let them all complete."""
    capped = tenant_name("capped")
    await store.tenants.add(capped, None, TenantLimits(running_steps=2))
    url = make_url(database_url).set(drivername="postgresql")
    holder = await psycopg.AsyncConnection.connect(url.render_as_string(hide_password=False))
    try:
        key = await slot_key(holder, capped)
        for slot in range(2):  # another worker's transactions running two of its steps
            await holder.execute("SELECT pg_advisory_lock(%s, %s)", (key, slot))
        await start_worker(name="one")
        await start_worker(name="two")
        held = [await playbook(*ONE_STEP, tenant=capped) for _ in range(4)]
        free = await playbook(*ONE_STEP)
        await wait_for_status(store, free, {InstanceStatus.COMPLETE})

        async def all_parked() -> bool:
            details = [await store.detail(key) for key in held]
            return all(d is not None and d.record.waiting is not None for d in details)

        # Creates of other tenants may finish first (no order is promised between tenants).
        await wait_until(all_parked, "the capped tenant's instances parked")
        for key in held:
            detail = await store.detail(key)
            assert detail is not None
            assert detail.journal == []
            assert detail.record.waiting is not None, detail.record
            assert detail.record.waiting.kind is WaitKind.THROTTLE
        await holder.execute("SELECT pg_advisory_unlock_all()")
        for key in held:
            await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    finally:
        await holder.close()


async def test_rate_limit_spreads_a_tenants_steps(store, start_worker, playbook):
    """Over its steps-per-second budget a tenant's steps are parked and run later; all end."""
    limited = tenant_name("rate")
    await store.tenants.add(limited, None, TenantLimits(steps_per_second=4))
    await start_worker()
    keys = [await playbook(*ONE_STEP, tenant=limited) for _ in range(8)]
    throttled_seen = False
    for _ in range(400):
        async with store._engine.connect() as connection:
            rows = (
                await connection.execute(
                    text("SELECT status, wait_kind FROM instances WHERE tenant = :t"),
                    {"t": limited},
                )
            ).all()
        throttled_seen |= any(row.wait_kind == "throttle" for row in rows)
        if len(rows) == len(keys) and all(row.status == "complete" for row in rows):
            break
        await asyncio.sleep(0.05)
    assert throttled_seen
    for key in keys:
        await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    async with store._engine.connect() as connection:
        tokens = (
            await connection.execute(
                text("SELECT tokens FROM tenant_rates WHERE tenant = :t"), {"t": limited}
            )
        ).scalar_one()
    assert tokens <= 4  # the bucket never holds more than a second's worth


async def slot_key(connection: psycopg.AsyncConnection[Any], tenant: str) -> int:
    cursor = await connection.execute("SELECT slot_key FROM tenants WHERE name = %s", (tenant,))
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


CRC32_TWINS = ("twina17c0a", "twin2100009")
"""Two tenant names with the same crc32, the hash running-step slots were once keyed by."""


async def test_tenants_whose_names_collide_do_not_share_running_step_slots(
    store, start_worker, playbook
):
    """Tenant A holding its only slot leaves tenant B's free, whatever their names hash to."""
    busy, other = CRC32_TWINS
    assert zlib.crc32(busy.encode()) == zlib.crc32(other.encode())
    for tenant in (busy, other):
        await store.tenants.add(tenant, None, TenantLimits(running_steps=1))
    async with store.transaction() as running:  # a worker in the middle of busy's step
        assert await running.grant_slots(busy, 1, 1) == 1
        await start_worker()
        key = await playbook(*ONE_STEP, tenant=other)
        await wait_for_status(store, key, {InstanceStatus.COMPLETE})
