"""Placement at the broker: a tenant bound aside has its creates, steps and wakes routed to its
side lane by RabbitMQ itself; its events and every other tenant's messages still reach the
lanes, and a topology declared by an earlier release is migrated without a message lost or
doubled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from stepfleet.broker import Broker, Topology
from stepfleet.workers.settings import Settings
from tests.integration.test_fairness import publish_probe

pytestmark = pytest.mark.services


@pytest.fixture
async def own(settings: Settings) -> AsyncIterator[Broker]:
    """A deployment of its own: probes are fetched back from its queues."""
    topology = Topology(f"{settings.prefix}-pl{uuid.uuid4().hex[:6]}", side_lanes=4)
    broker = Broker(settings.amqp_url, topology)
    await broker.connect(name="stepfleet-tests-placement")
    await broker.declare()
    yield broker
    await broker.delete_topology()
    await broker.close()


async def where(broker: Broker, tenant: str, kind: str) -> list[str]:
    """Publish one message of `kind` for `tenant`; the queues it reached (each copy once)."""
    topology = broker.topology
    probe = await publish_probe(broker, topology, tenant, kind)
    found: list[str] = []
    for _ in range(10):  # a copy may land in a second queue a moment after the first
        for queue in (*topology.work_queues, *topology.side_queues):
            for delivery in await broker.fetch(queue, limit=100):
                await delivery.ack()
                if delivery.message_id == probe:
                    found.append(queue)
        await asyncio.sleep(0.05)
    return found


async def test_a_tenant_placed_aside_has_its_creates_steps_and_wakes_routed_to_its_side_lane(
    own: Broker,
):
    topology = own.topology
    lanes = set(topology.work_queues)
    for kind in ("create", "event", "step", "wake"):
        [queue] = await where(own, "flood", kind)
        assert queue in lanes, kind
    await own.place_aside("flood", 2)
    await own.place_aside("flood", 2)  # renewing is harmless
    for kind in ("create", "step", "wake"):
        assert await where(own, "flood", kind) == [topology.side_queues[2]], kind
    [event] = await where(own, "flood", "event")
    assert event in lanes, "events keep their order: never placed aside"
    [other] = await where(own, "calm", "create")
    assert other in lanes
    await own.place_in_lanes("flood", 2)
    await own.place_in_lanes("flood", 2)  # so is undoing twice
    [back] = await where(own, "flood", "create")
    assert back in lanes


async def test_declaring_over_an_earlier_release_neither_loses_nor_doubles_a_message(
    own: Broker,
):
    """Earlier releases bound creates, steps and wakes straight to the lanes."""
    topology = own.topology
    channel = await own._channel().get_underlay_channel()
    for source, key in topology.placement_bindings():
        await channel.exchange_unbind(topology.placement_exchange, source, key)
        await channel.exchange_bind(topology.lanes_exchange, source, key)
    assert len(await where(own, "acme", "create")) == 1
    await own.declare()
    for kind in ("create", "event", "step", "wake"):
        [queue] = await where(own, "acme", kind)
        assert queue in topology.work_queues, kind
    await own.place_aside("acme", 1)
    assert await where(own, "acme", "create") == [topology.side_queues[1]]


async def test_bindings_use_the_channel_opened_ahead(own: Broker, monkeypatch):
    """Once `open_placement` has run, placing and unplacing open no channel (opened under a
    flood, one took 60-200 ms of the first binding)."""
    await own.open_placement()
    connection = own._connection
    assert connection is not None

    async def no_channel(*args: object, **kwargs: object) -> None:
        raise AssertionError("a binding opened a channel")

    monkeypatch.setattr(connection, "channel", no_channel)
    await own.place_aside("flood", 1)
    assert await where(own, "flood", "create") == [own.topology.side_queues[1]]
    await own.place_in_lanes("flood", 1)
    [back] = await where(own, "flood", "create")
    assert back in own.topology.work_queues
