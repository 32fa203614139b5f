"""Side lanes: a tenant over its share has its lane deliveries moved, and they come back as
they were; nothing else is moved, and a failed move loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from stepfleet.broker import Outgoing, PublishRefused, Topology
from stepfleet.cycle.messages import MOVED_KEY
from stepfleet.workers.inbox import FairInbox
from stepfleet.workers.placement import Placement
from stepfleet.workers.side_lanes import SideLanes
from tests.fakes import Acks, delivery

TOPOLOGY = Topology("t", side_lanes=4)
LANE = "t.work.0"
FLEET = "fleet-user"


def make(acks: Acks, tenant: str, kind: str, n: int = 0, *, user: str | None = "producer"):
    return delivery(
        acks,
        {"x-tenant": tenant, "x-kind": kind, "n": n},
        b'{"n": %d}' % n,
        exchange="t.ingress" if kind in ("create", "event") else "t.internal",
        user_id=user,
    )


class Published:
    def __init__(self, refuse: bool = False) -> None:
        self.messages: list[Outgoing] = []
        self.refuse = refuse

    async def __call__(self, messages: Sequence[Outgoing]) -> None:
        if self.refuse:
            raise PublishRefused("no")
        self.messages += messages


async def moved_through(lanes: SideLanes) -> None:
    task = asyncio.create_task(lanes.run())
    await lanes.stop()
    task.cancel()


async def test_a_tenant_over_its_backlog_has_its_next_deliveries_moved_and_restored():
    acks, inbox, published = Acks(), FairInbox(), Published()
    lanes = SideLanes(TOPOLOGY, inbox, published, backlog=2, fleet_user=FLEET)
    for n in range(2):
        inbox.put_nowait(make(acks, "flood", "create", n))
    calm = make(acks, "calm", "create")
    assert not lanes.take(calm, LANE)  # under its backlog: stays
    over = [make(acks, "flood", kind, n) for n, kind in enumerate(("create", "step", "wake"))]
    assert all(lanes.take(d, LANE) for d in over)
    event = make(acks, "flood", "event")
    assert not lanes.take(event, LANE)  # events keep their order: never moved
    await moved_through(lanes)
    assert acks.acked == over  # acked in the lane only once the copies were confirmed
    assert {m.exchange for m in published.messages} == {TOPOLOGY.side_exchange}
    assert len({m.routing_key for m in published.messages}) == 1  # one side lane per tenant
    assert lanes.moved == 3
    for original, copy in zip(over, published.messages, strict=True):
        assert copy.body == original.body
        assert copy.user_id is None  # published as the fleet's own user
        came_back = delivery(
            Acks(),
            copy.headers,
            copy.body,
            routing_key=copy.routing_key,
            exchange=TOPOLOGY.side_exchange,
            user_id=FLEET,
        )
        restored = lanes.restore(came_back)
        assert restored.routing_key == original.routing_key
        assert restored.exchange == original.exchange
        assert restored.user_id == original.user_id
        assert dict(restored.headers) == dict(original.headers)


async def test_moved_headers_count_only_on_what_the_fleet_published():
    lanes = SideLanes(TOPOLOGY, FairInbox(), Published(), backlog=1, fleet_user=FLEET)
    forged = delivery(
        Acks(),
        {"x-tenant": "a", "x-kind": "create", MOVED_KEY: "b.create"},
        b"{}",
        routing_key="0",
        exchange=TOPOLOGY.side_exchange,
        user_id="producer",
    )
    assert lanes.restore(forged) is forged


async def test_heavy_tenants_get_side_lanes_of_their_own():
    acks, inbox, published = Acks(), FairInbox(), Published()
    lanes = SideLanes(TOPOLOGY, inbox, published, backlog=1, fleet_user=FLEET)
    assert not lanes.take(make(acks, "calm", "event"), LANE)  # the lane is shared
    tenants = [f"t{i}" for i in range(4)]
    for tenant in tenants:
        inbox.put_nowait(make(acks, tenant, "step"))
        assert lanes.take(make(acks, tenant, "step", 1), LANE)
    await moved_through(lanes)
    assert len({m.routing_key for m in published.messages}) == 4


async def test_a_move_the_broker_refuses_leaves_the_delivery_to_be_processed_here():
    acks, inbox = Acks(), FairInbox()
    lanes = SideLanes(TOPOLOGY, inbox, Published(refuse=True), backlog=1, fleet_user=FLEET)
    assert not lanes.take(make(acks, "calm", "event"), LANE)
    inbox.put_nowait(make(acks, "flood", "step"))
    refused = make(acks, "flood", "step", 1)
    assert lanes.take(refused, LANE)
    await moved_through(lanes)
    assert acks.acked == []
    assert inbox.waiting("flood") == 2
    assert lanes.moved == 0


async def test_nothing_is_moved_once_stopping_or_without_side_lanes():
    acks, inbox = Acks(), FairInbox()
    inbox.put_nowait(make(acks, "flood", "step"))
    none = SideLanes(Topology("t", side_lanes=0), inbox, Published(), backlog=1, fleet_user=FLEET)
    assert not none.take(make(acks, "flood", "step", 1), LANE)
    lanes = SideLanes(TOPOLOGY, inbox, Published(), backlog=1, fleet_user=FLEET)
    await lanes.stop()
    assert not lanes.take(make(acks, "flood", "step", 1), LANE)


async def test_a_lane_only_the_flooding_tenant_uses_is_not_drained():
    """Nobody waits behind the flood there: moving would only cost the flooding tenant."""
    acks, inbox = Acks(), FairInbox()
    lanes = SideLanes(TOPOLOGY, inbox, Published(), backlog=1, fleet_user=FLEET)
    inbox.put_nowait(make(acks, "flood", "step"))
    assert not lanes.take(make(acks, "flood", "step", 1), LANE)
    assert not lanes.take(make(acks, "calm", "create"), "t.work.1")  # another lane
    assert not lanes.take(make(acks, "flood", "step", 2), LANE)
    assert not lanes.take(make(acks, "calm", "create"), LANE)  # now someone is behind it
    assert lanes.take(make(acks, "flood", "step", 3), LANE)


async def test_a_flooding_tenant_is_placed_aside_even_where_nothing_is_moved():
    """Placement does not wait for someone to be behind the flood: the next tenant to use the
    lane would find the flood ahead of it."""
    acks, inbox, placed = Acks(), FairInbox(), []

    class Noting(Placement):
        def flooding(self, tenant: str, now: float) -> None:
            placed.append(("flooding", tenant))

        def seen_placed(self, tenant: str, now: float) -> None:
            placed.append(("seen", tenant))

    async def bind(tenant: str, lane: int) -> None:
        raise AssertionError("not in this test")

    lanes = SideLanes(
        TOPOLOGY,
        inbox,
        Published(),
        backlog=1,
        fleet_user=FLEET,
        placement=Noting(TOPOLOGY.side_lanes, bind, bind),
    )
    assert not lanes.take(make(acks, "flood", "step"), LANE)
    assert placed == []
    inbox.put_nowait(make(acks, "flood", "step"))
    assert not lanes.take(make(acks, "flood", "event", 1), LANE)  # events stay where they are
    assert placed == []
    assert not lanes.take(make(acks, "flood", "create", 2), LANE)  # the lane is not shared
    assert placed == [("flooding", "flood")]
    # A side lane's message the broker routed there (no x-moved-* headers): placed aside.
    routed = make(acks, "flood", "create", 3)
    assert lanes.restore(routed) is routed
    assert placed[-2:] == [("seen", "flood"), ("flooding", "flood")]
