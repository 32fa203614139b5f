"""Side lanes: a tenant over its share of a worker has its further deliveries moved out of the
shared lanes, so the tenants behind it in the same lane are reached at once.

A lane is a first-in-first-out queue that several tenants share. A tenant that publishes
20,000 messages puts them ahead of everything published after them in its lane, and no
scheduling inside a worker can reach a message the broker has not delivered. So when a tenant
already has `backlog` deliveries waiting in a worker's inbox, and another tenant used the same
lane in the last `SHARED_FOR_SECONDS` (10 minutes; a lane only one tenant uses has nobody behind
the flood to let through, and moving would only cost that tenant), that worker moves its
next creates, steps and wakes from the lane to one of the side lanes (quorum queues like the
lanes, consumed by every worker, `STEPFLEET_SIDE_LANES`): published with a confirm, then acked
in the lane. A move is a publish and an ack, far cheaper than running the step, so the lane
drains at the pace of moves and another tenant's message behind the flood arrives within
moments; the heavy tenant's work waits in its side lane, where only other heavy tenants can be
ahead of it, and enters the inbox as fast as the worker takes it (where weighted fair queuing
shares the batches, see workers/inbox.py).

Each worker gives the heavy tenants it sees side lanes of their own where it can: a tenant's
preferred side lanes follow a hash of its name, and one already taken by another heavy tenant
of this worker is skipped. Events are never moved: a producer's events for one instance keep
their order. The moved copy keeps the body, the headers and the message id, and carries the
original routing key, exchange and producer user in `x-moved-*` headers; the fleet publishes
it as its own user, and a worker restores those three only for messages of the side lanes that
the fleet's user published, so the delivery is checked exactly like the original (the producer
check, the routing key check). A move that fails (the broker refuses or is away) leaves the
delivery to be processed where it is; an ack that fails after the copy was confirmed makes the
original come back as well, which the journal turns into a duplicate like any redelivery.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import structlog

from stepfleet.broker import BrokerUnavailable, Delivery, Outgoing, PublishRefused, Topology
from stepfleet.cycle.messages import MOVED_EXCHANGE, MOVED_KEY, MOVED_USER
from stepfleet.schemas import MessageKind
from stepfleet.workers.inbox import FairInbox, tenant_of
from stepfleet.workers.placement import Placement

log = structlog.get_logger("stepfleet.worker")

_MOVED = (MOVED_KEY, MOVED_EXCHANGE, MOVED_USER)
_MOVABLE = frozenset({MessageKind.CREATE.value, MessageKind.STEP.value, MessageKind.WAKE.value})
_MOST_PER_PUBLISH = 500
SHARED_FOR_SECONDS = 600.0
"""A lane counts as shared while another tenant used it this recently."""
_HEAVY_FOR_SECONDS = 30.0
"""How long a tenant keeps its side lane after its last move."""


class SideLanes:
    """Moves deliveries of tenants over their share out of the lanes; restores moved ones."""

    def __init__(
        self,
        topology: Topology,
        inbox: FairInbox,
        publish: Callable[[Sequence[Outgoing]], Awaitable[None]],
        *,
        backlog: int,
        fleet_user: str,
        placement: Placement | None = None,
    ) -> None:
        self._topology = topology
        self._placement = placement
        self._inbox = inbox
        self._publish = publish
        self._backlog = backlog
        self._fleet_user = fleet_user
        self._moving: list[Delivery] = []
        self._to_move = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = False
        self._seen: dict[str, dict[str, float]] = {}
        """Per lane, the tenants this worker took deliveries of and when it last did."""
        self._pruned_at = time.monotonic()
        self._lanes: dict[str, tuple[int, float]] = {}
        """Heavy tenants: their side lane and when they last had a delivery moved."""
        self.moved = 0
        self.placed = 0
        """Deliveries the broker itself routed to a side lane (a placement binding)."""

    def take(self, delivery: Delivery, lane: str) -> bool:
        """Whether `delivery` (from `lane`) is to be moved; if so, it will be (or, should the
        move fail, handed to the inbox)."""
        if self._stopped or not self._topology.side_lanes:
            return False
        tenant, _, kind = delivery.routing_key.rpartition(".")
        now = time.monotonic()
        seen = self._seen.setdefault(lane, {})
        seen[tenant] = now
        if kind not in _MOVABLE or self._inbox.waiting(tenant) < self._backlog:
            return False
        if self._placement is not None:
            self._placement.flooding(tenant, now)
        if not self._shared(lane, tenant, now):
            return False
        self._moving.append(delivery)
        self._idle.clear()
        self._to_move.set()
        return True

    def _shared(self, lane: str, tenant: str, now: float) -> bool:
        """Whether another tenant used the lane within `SHARED_FOR_SECONDS` (give or take the
        second between two prunings): only then can anyone be waiting behind this tenant."""
        if now - self._pruned_at > 1.0:
            self._pruned_at = now
            for seen in self._seen.values():
                for other in [t for t, at in seen.items() if now - at > SHARED_FOR_SECONDS]:
                    del seen[other]
        return any(other != tenant for other in self._seen.get(lane, ()))

    def restore(self, delivery: Delivery) -> Delivery:
        """A side lane's delivery as it was in its lane (when the fleet moved it)."""
        headers = delivery.headers
        if delivery.user_id != self._fleet_user or MOVED_KEY not in headers:
            self._placed(delivery)
            return delivery
        return replace(
            delivery,
            routing_key=str(headers[MOVED_KEY]),
            exchange=str(headers.get(MOVED_EXCHANGE, "")),
            user_id=str(headers.get(MOVED_USER, "")) or None,
            headers={k: v for k, v in headers.items() if k not in _MOVED},
        )

    def _placed(self, delivery: Delivery) -> None:
        """Note a delivery the broker routed to a side lane (a placement binding)."""
        self.placed += 1
        if self._placement is None:
            return
        tenant = tenant_of(delivery)
        now = time.monotonic()
        self._placement.seen_placed(tenant, now)
        if self._inbox.waiting(tenant) >= self._backlog:
            self._placement.flooding(tenant, now)

    async def run(self) -> None:
        """Move what `take` accepted, in publishes of up to `_MOST_PER_PUBLISH`."""
        while True:
            await self._to_move.wait()
            self._to_move.clear()
            while self._moving:
                batch = self._moving[:_MOST_PER_PUBLISH]
                del self._moving[:_MOST_PER_PUBLISH]
                await self._move(batch)
            self._idle.set()

    async def stop(self) -> None:
        """Take no more, and wait until what was taken is moved or in the inbox."""
        self._stopped = True
        await self._idle.wait()

    async def _move(self, deliveries: list[Delivery]) -> None:
        now = time.monotonic()
        copies = [self._copy(delivery, now) for delivery in deliveries]
        try:
            await self._publish(copies)
        except (BrokerUnavailable, PublishRefused) as exc:
            log.warning("side_lane_move_failed", error=str(exc), count=len(deliveries))
            for delivery in deliveries:
                self._inbox.put_nowait(delivery)
            return
        self.moved += len(deliveries)
        try:
            await asyncio.gather(*(delivery.ack() for delivery in deliveries))
        except BrokerUnavailable as exc:
            # The originals come back too: duplicates by position (or the same create).
            log.warning("side_lane_ack_failed", error=str(exc))

    def _copy(self, delivery: Delivery, now: float) -> Outgoing:
        headers = {
            **delivery.headers,
            MOVED_KEY: delivery.routing_key,
            MOVED_EXCHANGE: delivery.exchange,
            MOVED_USER: delivery.user_id or "",
        }
        lane = self._lane_of(tenant_of(delivery), now)
        return Outgoing(
            self._topology.side_exchange, str(lane), delivery.body, headers, delivery.message_id
        )

    def _lane_of(self, tenant: str, now: float) -> int:
        """The tenant's side lane: the first of its preferred ones no other heavy tenant of
        this worker has."""
        held = self._lanes.get(tenant)
        if held is None or now - held[1] > _HEAVY_FOR_SECONDS:
            self._lanes = {
                t: (lane, at)
                for t, (lane, at) in self._lanes.items()
                if now - at <= _HEAVY_FOR_SECONDS
            }
            taken = {lane for lane, _ in self._lanes.values()}
            count = self._topology.side_lanes
            preferred = sorted(range(count), key=lambda i: zlib.crc32(f"{i}:{tenant}".encode()))
            lane = next((i for i in preferred if i not in taken), preferred[0])
        else:
            lane = held[0]
        self._lanes[tenant] = (lane, now)
        return lane
