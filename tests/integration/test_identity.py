"""Tenant identity comes from the broker: per-tenant producer users and the AMQP user_id.

Each test creates producer users through the management API (as `stepfleet tenant add`
does), connects as them with a bare AMQP client and checks what the broker and the workers
let through.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiormq
import pytest

from stepfleet.broker import Outgoing
from stepfleet.control import DeadLetters
from stepfleet.schemas import InstanceKey, InstanceStatus, TenantLimits, digest_of
from stepfleet.store import LetterFilter
from tests.conftest import ORDER_PARAMS, hostile_wasm
from tests.integration.conftest import RawClient, wait_for_status
from tests.integration.test_fleet import dead_letter_of

pytestmark = pytest.mark.services

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED}


async def publish(
    channel: Any,
    prefix: str,
    *,
    routing_key: str,
    headers: dict[str, str],
    body: dict[str, Any],
    user_id: str | None,
    exchange: str = "ingress",
) -> str:
    message_id = uuid.uuid4().hex
    confirmation = await channel.basic_publish(
        json.dumps(body).encode(),
        exchange=f"{prefix}.{exchange}",
        routing_key=routing_key,
        mandatory=True,
        properties=aiormq.spec.Basic.Properties(
            delivery_mode=2, message_id=message_id, headers=headers, user_id=user_id
        ),
    )
    assert isinstance(confirmation, aiormq.spec.Basic.Ack), confirmation
    return message_id


def create_headers(tenant: str, instance_id: str, module: str) -> dict[str, str]:
    return {
        "x-tenant": tenant,
        "x-instance-id": instance_id,
        "x-module": module,
        "x-kind": "create",
        "x-schema-version": "1",
    }


async def reason_of(raw_client: RawClient, message_id: str) -> str:
    letter = await raw_client.dead_letter(message_id)
    headers = letter.header.properties.headers or {}
    value = headers["x-dead-reason"]
    return value.decode() if isinstance(value, bytes) else value


async def test_a_tenant_producer_runs_its_own_workflows(
    settings, store, start_worker, tenant, connect, order_wasm
):
    name, credentials = await tenant()
    digest = digest_of(order_wasm)
    await store.put_module(name, digest, order_wasm)
    await start_worker()
    channel = await connect(credentials)
    instance_id = f"own-{uuid.uuid4().hex[:8]}"
    await publish(
        channel,
        settings.prefix,
        routing_key=f"{name}.create",
        headers=create_headers(name, instance_id, digest),
        body={"params": ORDER_PARAMS},
        user_id=credentials.user,
    )
    record, _ = await wait_for_status(store, InstanceKey(name, instance_id), FINAL)
    assert record.status is InstanceStatus.COMPLETE


async def test_spoofed_or_missing_identity_is_dead_lettered(
    settings, store, start_worker, tenant, connect, raw, order_wasm
):
    """A producer claiming another tenant in x-tenant, or sending no user_id, changes nothing."""
    mallory, mallory_credentials = await tenant()
    victim, _ = await tenant()
    digest = digest_of(order_wasm)
    await store.put_module(victim, digest, order_wasm)
    await start_worker()
    channel = await connect(mallory_credentials)
    spoofed_id = f"spoof-{uuid.uuid4().hex[:8]}"
    spoofed = await publish(
        channel,
        settings.prefix,
        routing_key=f"{mallory}.create",  # its own routing key: the broker lets it through
        headers=create_headers(victim, spoofed_id, digest),
        body={"params": ORDER_PARAMS},
        user_id=mallory_credentials.user,
    )
    anonymous = await publish(
        channel,
        settings.prefix,
        routing_key=f"{mallory}.create",
        headers=create_headers(mallory, f"anon-{uuid.uuid4().hex[:8]}", digest),
        body={"params": ORDER_PARAMS},
        user_id=None,
    )
    internal_kind = await publish(
        channel,
        settings.prefix,
        routing_key=f"{mallory}.create",
        headers={**create_headers(mallory, "x", digest), "x-kind": "step"},
        body={"position": 0},
        user_id=mallory_credentials.user,
    )
    assert await reason_of(raw, spoofed) == "tenant-mismatch"
    assert await reason_of(raw, anonymous) == "unverified-producer"
    assert await reason_of(raw, internal_kind) == "kind-not-allowed"
    # A step's own routing key is not bound on the ingress exchange: the broker returns it.
    with pytest.raises(aiormq.exceptions.PublishError, match="NO_ROUTE"):
        await publish(
            channel,
            settings.prefix,
            routing_key=f"{mallory}.step",
            headers={**create_headers(mallory, "y", digest), "x-kind": "step"},
            body={"position": 0},
            user_id=mallory_credentials.user,
        )
    assert await store.find_instances(spoofed_id, victim) == []


async def test_cross_tenant_instances_and_modules_are_out_of_reach(
    settings, store, start_worker, tenant, connect, raw, order_wasm
):
    """Instance ids and modules are per tenant: another tenant's are unknown to a producer."""
    owner, owner_credentials = await tenant()
    other, other_credentials = await tenant()
    digest = digest_of(order_wasm)
    await store.put_module(owner, digest, order_wasm)
    await start_worker(early_event_seconds=0)  # dead-letter events for no instance at once
    instance_id = f"mine-{uuid.uuid4().hex[:8]}"
    owner_channel = await connect(owner_credentials)
    await publish(
        owner_channel,
        settings.prefix,
        routing_key=f"{owner}.create",
        headers=create_headers(owner, instance_id, digest),
        body={"params": ORDER_PARAMS},
        user_id=owner_credentials.user,
    )
    await wait_for_status(store, InstanceKey(owner, instance_id), FINAL)
    channel = await connect(other_credentials)
    event = await publish(
        channel,
        settings.prefix,
        routing_key=f"{other}.event",
        headers={
            "x-tenant": other,
            "x-instance-id": instance_id,
            "x-kind": "event",
            "x-schema-version": "1",
        },
        body={"event_id": "e1", "type": "poke"},
        user_id=other_credentials.user,
    )
    borrowed = await publish(
        channel,
        settings.prefix,
        routing_key=f"{other}.create",
        headers=create_headers(other, f"borrow-{uuid.uuid4().hex[:8]}", digest),
        body={"params": ORDER_PARAMS},
        user_id=other_credentials.user,
    )
    assert await reason_of(raw, event) == "unknown-instance"
    assert await reason_of(raw, borrowed) == "unknown-module"


@pytest.mark.parametrize(
    "attempt",
    ["another-tenants-routing-key", "someone-elses-user-id", "internal-exchange", "read-a-queue"],
)
async def test_the_broker_refuses_what_a_producer_user_may_not_do(
    settings, tenant, connect, attempt
):
    """Producer users can only publish, to ingress, under their own routing keys, as
    themselves; they read nothing (dead letters, work) and cannot publish fleet messages."""
    name, credentials = await tenant()
    channel = await connect(credentials)
    headers = create_headers(name, "i", "sha256:" + "a" * 64)
    if attempt == "read-a-queue":
        forbidden = channel.basic_get(f"{settings.prefix}.dead")
    else:
        forbidden = publish(
            channel,
            settings.prefix,
            routing_key="victim.create" if attempt.startswith("another") else f"{name}.step",
            headers=headers,
            body={},
            user_id="guest" if attempt.startswith("someone") else credentials.user,
            exchange="internal" if attempt == "internal-exchange" else "ingress",
        )
    with pytest.raises(aiormq.exceptions.ChannelClosed) as refused:
        await forbidden
    assert any(code in str(refused.value) for code in ("ACCESS_REFUSED", "PRECONDITION_FAILED"))


@pytest.mark.parametrize(
    ("limits", "module", "expected"),
    [
        (
            TenantLimits(fuel_per_run=1_000_000),
            "loop",
            "the workflow code failed between steps, at journal position 0: "
            "CPU limit exceeded: the run used all 1000000 units of fuel",
        ),
        (TenantLimits(memory_bytes=2 * 65536), "membomb", "131072"),
    ],
    ids=["cpu", "memory"],
)
async def test_tenant_limits_apply_to_its_runs(
    settings, store, start_worker, tenant, connect, limits, module, expected
):
    """A tenant's own CPU budget and memory cap replace the fleet's for its runs."""
    name, credentials = await tenant(limits)
    wasm = hostile_wasm(module)
    digest = digest_of(wasm)
    await store.put_module(name, digest, wasm)
    await start_worker()
    channel = await connect(credentials)
    instance_id = f"{module}-{uuid.uuid4().hex[:8]}"
    await publish(
        channel,
        settings.prefix,
        routing_key=f"{name}.create",
        headers=create_headers(name, instance_id, digest),
        body={"params": {}},
        user_id=credentials.user,
    )
    record, _ = await wait_for_status(store, InstanceKey(name, instance_id), FINAL)
    assert record.status is InstanceStatus.ERRORED
    assert expected in (record.error or ""), record.error


async def test_a_replay_cannot_publish_for_another_tenant_than_its_producers(
    settings, topology, broker, store, start_worker, tenant, connect
):
    """A letter a tenant's producer sent with another tenant's x-tenant (refused before the
    producer check ran, e.g. for a bad body) is not replayed as the operator."""
    mallory, credentials = await tenant()
    victim, _ = await tenant()
    await start_worker()
    channel = await connect(credentials)
    instance_id = f"x-{uuid.uuid4().hex[:8]}"
    await channel.basic_publish(
        b"{not json",
        exchange=f"{settings.prefix}.ingress",
        routing_key=f"{mallory}.create",
        properties=aiormq.spec.Basic.Properties(
            delivery_mode=2,
            headers=create_headers(victim, instance_id, "sha256:" + "a" * 64),
            user_id=credentials.user,
        ),
    )
    letter = await dead_letter_of(store, instance_id)
    assert letter.reason == "bad-body"
    letters = DeadLetters(store, broker, topology, user_id="guest", actor="test")
    outcome = await letters.replay(LetterFilter(ids=(letter.id,)))
    assert outcome.done == []
    assert "not tenant" in outcome.skipped[letter.id]


async def _lanes_holding(broker, topology, message_ids: set[str]) -> dict[str, int]:
    """Where each message sits (no worker may be running); the messages are taken."""
    found: dict[str, int] = {}
    for _ in range(50):
        for lane, queue in enumerate(topology.work_queues):
            for delivery in await broker.fetch(queue, limit=500):
                await delivery.ack()
                if delivery.message_id in message_ids:
                    found[delivery.message_id] = lane
        if len(found) == len(message_ids):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"found only {found} of {message_ids}")


async def test_a_producer_cannot_steer_its_messages_into_another_tenants_lane(
    settings, topology, broker, tenant, connect, order_wasm
):
    """Lanes follow the routing key, which topic permissions confine to the producer's tenant:
    neither a spoofed x-tenant nor CC/BCC headers move a message into the victim's lane."""
    mallory, credentials = await tenant()
    channel = await connect(credentials)
    digest = digest_of(order_wasm)

    async def send(headers: dict[str, Any]) -> str:
        return await publish(
            channel,
            settings.prefix,
            routing_key=f"{mallory}.create",
            headers={**create_headers(mallory, f"lane-{uuid.uuid4().hex[:6]}", digest), **headers},
            body={"params": ORDER_PARAMS},
            user_id=credentials.user,
        )

    own = await send({})
    own_lane = (await _lanes_holding(broker, topology, {own}))[own]
    victim = f"v{uuid.uuid4().hex[:10]}"
    while True:  # a victim whose creates hash to another lane than mallory's
        probe = uuid.uuid4().hex
        await broker.publish_many(
            [
                Outgoing(
                    topology.ingress_exchange,
                    f"{victim}.create",
                    b"{}",
                    {"x-tenant": victim},
                    message_id=probe,
                    user_id="guest",
                )
            ]
        )
        if (await _lanes_holding(broker, topology, {probe}))[probe] != own_lane:
            break
        victim = f"v{uuid.uuid4().hex[:10]}"
    attacks = {
        await send({"x-tenant": victim}),
        await send({"CC": [f"{victim}.create"]}),
        await send({"BCC": [f"{victim}.create"]}),
        await send({"x-tenant": victim, "CC": [f"{victim}.create", f"{victim}.event"]}),
    }
    placed = await _lanes_holding(broker, topology, attacks)
    assert set(placed.values()) == {own_lane}


PER_TENANT_LIMITS = [
    pytest.param(
        TenantLimits(max_steps=2),
        [{"op": "do", "name": n} for n in ("a", "b", "c")],
        "the instance reached its limit of 2 journal entries",
        id="journal-entries",
    ),
    pytest.param(
        TenantLimits(max_state_bytes=1024),
        [{"op": "random", "name": n, "bytes": 256} for n in ("a", "b", "c")],
        "the limit is 1024",
        id="state-bytes",
    ),
    pytest.param(
        TenantLimits(host_calls_per_step=0),
        [{"op": "http", "name": "get", "url": "http://127.0.0.1:9/"}],
        "a step may make 0 HTTP call(s)",
        id="host-calls-per-step",
    ),
]


@pytest.mark.parametrize(("limits", "ops", "message"), PER_TENANT_LIMITS)
async def test_each_per_tenant_limit_applies_to_that_tenants_runs(
    store, start_worker, playbook, limits, ops, message
):
    """A limit set for one tenant holds for its runs; the same workflow of another tenant,
    under the fleet's limits, completes."""
    limited = f"lim{uuid.uuid4().hex[:8]}"
    await store.tenants.add(limited, None, limits)
    await start_worker()
    held = await playbook(*ops, tenant=limited)
    free = await playbook(*ops)
    record, _ = await wait_for_status(store, held, FINAL)
    detail = await store.detail(held)
    assert detail is not None
    shown = [record.error or "", record.output or "", *(e.value for e in detail.journal)]
    assert any(message in text for text in shown), shown
    record, _ = await wait_for_status(store, free, FINAL)
    assert record.status is InstanceStatus.COMPLETE
    assert message not in (record.output or "")
