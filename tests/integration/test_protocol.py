"""docs/protocol.md is enough to write a producer: a bare AMQP client drives the fleet.

The messages here are built from the doc alone (exchange `<prefix>.ingress`, routing key
`<tenant>.<kind>`, properties, headers, JSON body) and published with aiormq directly, not with
stepfleet's Producer or Broker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiormq
import pytest
from aiormq.abc import DeliveredMessage

from stepfleet.schemas import InstanceKey, InstanceStatus, digest_of
from tests.conftest import ORDER_OUTPUT, ORDER_PARAMS
from tests.integration.conftest import wait_for_status

pytestmark = pytest.mark.services

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED}


def new_tenant() -> str:
    return f"proto-{uuid.uuid4().hex[:10]}"


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class RawClient:
    """A producer written from docs/protocol.md: one confirming channel, plus a dead-letter tap."""

    prefix: str
    channel: aiormq.abc.AbstractChannel
    letters: asyncio.Queue[DeliveredMessage]

    async def publish(
        self,
        tenant: str,
        instance_id: str,
        kind: str,
        body: dict[str, Any],
        module: str | None = None,
    ) -> str:
        """Publish one message as the doc describes it; return its message id."""
        headers = {
            "x-tenant": tenant,
            "x-instance-id": instance_id,
            "x-kind": kind,
            "x-schema-version": "1",
        }
        if module is not None:
            headers["x-module"] = module
        message_id = f"{tenant}/{instance_id}/{kind}"
        confirmation = await self.channel.basic_publish(
            json.dumps(body).encode("utf-8"),
            exchange=f"{self.prefix}.ingress",
            routing_key=f"{tenant}.{kind}",
            mandatory=True,
            properties=aiormq.spec.Basic.Properties(
                delivery_mode=2,
                content_type="application/json",
                message_id=message_id,
                headers=headers,
            ),
        )
        assert isinstance(confirmation, aiormq.spec.Basic.Ack), confirmation
        return message_id

    async def dead_letter(self, message_id: str, timeout: float = 15.0) -> DeliveredMessage:
        """Wait for the dead letter of one message (other tests' letters are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                letter = await self.letters.get()
                if letter.header.properties.message_id == message_id:
                    return letter

    def dead_letter_ids(self) -> set[str | None]:
        """The message ids of the dead letters received so far."""
        ids = set()
        while not self.letters.empty():
            ids.add(self.letters.get_nowait().header.properties.message_id)
        return ids


@pytest.fixture
async def raw(settings, broker) -> AsyncIterator[RawClient]:
    """A bare aiormq connection with a queue of its own bound to `<prefix>.dead-letter`."""
    connection = await aiormq.connect(settings.amqp_url)
    channel = await connection.channel()  # publisher confirms are on by default
    letters: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
    declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
    assert declared.queue is not None
    await channel.queue_bind(declared.queue, f"{settings.prefix}.dead-letter", routing_key="")
    await channel.basic_consume(declared.queue, letters.put, no_ack=True)
    yield RawClient(settings.prefix, channel, letters)
    await connection.close()


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
    await asyncio.sleep(0.3)
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
