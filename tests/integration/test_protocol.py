"""docs/protocol.md is enough to write a producer: a bare AMQP client drives the fleet.

The messages here are built from the doc alone (exchange `<prefix>.ingress`, routing key
`<tenant>.<kind>`, properties, headers, JSON body) and published with aiormq directly, not with
stepfleet's Producer or Broker.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from stepfleet.schemas import InstanceKey, InstanceStatus, digest_of
from tests.conftest import ORDER_OUTPUT, ORDER_PARAMS
from tests.integration.conftest import wait_for_status

pytestmark = pytest.mark.services

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED}


def new_tenant() -> str:
    return f"proto-{uuid.uuid4().hex[:10]}"


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


async def push(store, tenant: str, wasm: bytes) -> str:
    digest = digest_of(wasm)
    await store.put_module(tenant, digest, wasm)
    return digest


async def test_create_from_a_bare_amqp_client_completes(raw, store, start_worker, order_wasm):
    """A create message published as protocol.md describes runs the C example to completion."""
    tenant, instance_id = new_tenant(), str(uuid.uuid4())
    digest = await push(store, tenant, order_wasm)
    await start_worker()
    await raw.publish(
        tenant, instance_id, "create", {"version": 1, "params": ORDER_PARAMS}, module=digest
    )
    record, params = await wait_for_status(store, InstanceKey(tenant, instance_id), FINAL)
    assert record.status is InstanceStatus.COMPLETE, record.error
    assert json.loads(record.output) == ORDER_OUTPUT
    assert record.module == digest
    assert json.loads(params) == ORDER_PARAMS


async def test_repeated_create_is_acknowledged_and_ignored(raw, store, start_worker, order_wasm):
    """A second create for an existing instance changes nothing and is not dead-lettered."""
    tenant, instance_id = new_tenant(), str(uuid.uuid4())
    key = InstanceKey(tenant, instance_id)
    digest = await push(store, tenant, order_wasm)
    # One pipeline handles deliveries in order, so the marker finishes after the repeat.
    await start_worker(concurrency=1)
    await raw.publish(tenant, instance_id, "create", {"params": ORDER_PARAMS}, module=digest)
    first, _ = await wait_for_status(store, key, FINAL)
    assert first.status is InstanceStatus.COMPLETE, first.error

    repeat = await raw.publish(
        tenant, instance_id, "create", {"params": {"order_id": "B-2"}}, module=digest
    )
    marker = str(uuid.uuid4())
    await raw.publish(tenant, marker, "create", {"params": ORDER_PARAMS}, module=digest)
    await wait_for_status(store, InstanceKey(tenant, marker), FINAL)

    again, params = await wait_for_status(store, key, FINAL)
    assert again.output == first.output
    assert again.updated_at == first.updated_at
    assert json.loads(params) == ORDER_PARAMS
    # A create the worker must refuse, handled after the repeat (same lane, one pipeline):
    # once its dead letter is here, one for the repeat would have arrived before it.
    probe = await raw.publish(
        tenant, str(uuid.uuid4()), "create", {"params": ORDER_PARAMS}, module="sha256:" + "0" * 64
    )
    await raw.dead_letter(probe)
    assert repeat not in raw.dead_letter_ids()


async def test_create_for_a_module_never_pushed_is_dead_lettered(raw, store, start_worker):
    """A create naming a module the tenant never pushed is dead-lettered as unknown-module."""
    tenant, instance_id = new_tenant(), str(uuid.uuid4())
    await start_worker()
    body = {"version": 1, "params": ORDER_PARAMS}
    module = "sha256:" + "0" * 64
    message_id = await raw.publish(tenant, instance_id, "create", body, module=module)
    letter = await raw.dead_letter(message_id)
    headers = {k: _text(v) for k, v in (letter.header.properties.headers or {}).items()}
    assert headers["x-dead-reason"] == "unknown-module"
    assert headers["x-dead-detail"]
    assert headers["x-original-routing-key"] == f"{tenant}.create"
    assert headers["x-tenant"] == tenant
    assert headers["x-instance-id"] == instance_id
    assert headers["x-module"] == module
    assert json.loads(letter.body) == body
    assert await store.find_instances(instance_id, tenant) == []


async def test_event_for_a_finished_instance_is_dead_lettered(raw, store, start_worker, order_wasm):
    """An event for a complete instance is refused as instance-finished, as documented."""
    tenant, instance_id = new_tenant(), str(uuid.uuid4())
    digest = await push(store, tenant, order_wasm)
    await start_worker()
    await raw.publish(tenant, instance_id, "create", {"params": ORDER_PARAMS}, module=digest)
    await wait_for_status(store, InstanceKey(tenant, instance_id), FINAL)

    event = {"version": 1, "event_id": "payment-7731", "type": "payment.settled"}
    message_id = await raw.publish(tenant, instance_id, "event", event)
    letter = await raw.dead_letter(message_id)
    headers = letter.header.properties.headers or {}
    assert _text(headers["x-dead-reason"]) == "instance-finished"
    assert _text(headers["x-original-routing-key"]) == f"{tenant}.event"


async def test_events_published_right_after_their_create_reach_their_instances(
    raw, store, start_worker, playbook_wasm
):
    """A create and its event published back to back (each confirmed, as protocol.md says),
    on a fleet of two workers, many times: every event is taken by its instance's wait,
    though the event often reaches a worker before the create has committed. Every third
    event is even published before its create. None is dead-lettered."""
    tenant = new_tenant()
    digest = await push(store, tenant, playbook_wasm)
    await start_worker("a")
    await start_worker("b")
    params = {"ops": [{"op": "wait", "name": "w", "type": "go", "timeout_ms": 60_000}]}
    ids = [f"early-{i}-{uuid.uuid4().hex[:6]}" for i in range(60)]
    for n, instance_id in enumerate(ids):
        create = ("create", {"version": 1, "params": params})
        event = ("event", {"version": 1, "event_id": "e1", "type": "go", "payload": n})
        for kind, body in (event, create) if n % 3 == 0 else (create, event):
            await raw.publish(
                tenant, instance_id, kind, body, module=digest if kind == "create" else None
            )
    for n, instance_id in enumerate(ids):
        record, _ = await wait_for_status(store, InstanceKey(tenant, instance_id), FINAL, 60)
        assert record.status is InstanceStatus.COMPLETE, record.error
        assert json.loads(record.output) == {"w": n}
    assert not {i for i in raw.dead_letter_ids() if i and i.startswith(f"{tenant}/")}
    assert await store.held_events(InstanceKey(tenant, ids[0])) == []
