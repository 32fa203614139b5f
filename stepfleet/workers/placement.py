"""Placing a flooding tenant aside at the broker: its creates, steps and wakes go straight to a
side lane instead of a shared lane, until it has been quiet for a while.

Moving deliveries out of a lane (workers/side_lanes.py) only reaches what the broker has
already put in the lane, at the pace one worker's event loop can publish copies; a producer
that publishes thousands of creates at once stays ahead of it for seconds, and every tenant that
shares the lane waits behind. So as soon as a tenant has `STEPFLEET_TENANT_BACKLOG` deliveries
waiting in a worker, that worker also binds the tenant's keys (`<tenant>.*`) on the placement
exchange to the tenant's home side lane; from then on RabbitMQ routes its new messages there
itself, and the lanes hold only what was published before. The placement exchange sends what no
binding takes to the lanes (its alternate exchange), so every other tenant's messages are placed
as before.

A binding is broker state shared by the fleet, so each tenant has exactly one home side lane
(by a hash of its name): two workers binding it to two side lanes would copy every message.
Each worker that sees the tenant over its backlog renews the binding every `REFRESH_SECONDS`,
and the worker that sees it quiet for `QUIET_SECONDS` removes it; a binding left by a worker
that crashed is removed the same way by whichever worker receives a message it routed. Placing
is an optimisation of where messages wait, never of whether they are processed: a message
routed either way reaches a queue every worker consumes, and a bind or unbind that fails is
tried again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Awaitable, Callable

import structlog

from stepfleet.broker import BrokerUnavailable

log = structlog.get_logger("stepfleet.worker")

REFRESH_SECONDS = 5.0
"""How often a worker renews the binding of a tenant it sees flooding (another worker may have
removed it meanwhile)."""
QUIET_SECONDS = 30.0
"""How long a placed tenant must have had no backlog in a worker before that worker removes
its binding."""

Bind = Callable[[str, int], Awaitable[None]]


def home_side_lane(tenant: str, side_lanes: int) -> int:
    """The side lane every worker places `tenant` in: the first of its preferred ones."""
    return min(range(side_lanes), key=lambda i: zlib.crc32(f"{i}:{tenant}".encode()))


class Placement:
    """Keeps the placement bindings of the tenants this worker sees flooding."""

    def __init__(self, side_lanes: int, place_aside: Bind, place_in_lanes: Bind) -> None:
        self._side_lanes = side_lanes
        self._place_aside = place_aside
        self._place_in_lanes = place_in_lanes
        self._heavy_at: dict[str, float] = {}
        """Tenants this worker saw over their backlog, and when it last did."""
        self._placed_at: dict[str, float] = {}
        """Tenants placed aside as far as this worker knows, and when it last bound them (0 for
        a binding it only saw a message of)."""
        self._due: set[str] = set()
        self._wake = asyncio.Event()

    def home(self, tenant: str) -> int:
        """The tenant's home side lane (asked only when binding: no cache needed)."""
        return home_side_lane(tenant, self._side_lanes)

    def flooding(self, tenant: str, now: float) -> None:
        """The tenant has a backlog in this worker: place it aside if it is not (or renew)."""
        self._heavy_at[tenant] = now
        if now - self._placed_at.get(tenant, -REFRESH_SECONDS) >= REFRESH_SECONDS:
            self._placed_at[tenant] = now
            self._due.add(tenant)
            self._wake.set()

    def seen_placed(self, tenant: str, now: float) -> None:
        """A message of the tenant reached a side lane through its binding."""
        if tenant not in self._placed_at:
            self._placed_at[tenant] = 0.0
            self._heavy_at.setdefault(tenant, now)

    async def run(self) -> None:
        """Bind what `flooding` asked for at once; once a second, unbind the quiet."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            await self.settle(time.monotonic())

    async def settle(self, now: float) -> None:
        """Bind the tenants found flooding since the last call, unbind those quiet by `now`."""
        for tenant in sorted(self._due):
            self._due.discard(tenant)
            await self._apply(self._place_aside, "tenant_placed_aside", tenant)
        for tenant in [t for t in self._placed_at if self._quiet(t, now)]:
            if await self._apply(self._place_in_lanes, "tenant_placed_in_lanes", tenant):
                del self._placed_at[tenant]
                self._heavy_at.pop(tenant, None)

    async def stop(self) -> None:
        """Remove the bindings this worker made: a worker still seeing the tenant flood renews
        its own within `REFRESH_SECONDS`."""
        for tenant, placed_at in list(self._placed_at.items()):
            if placed_at:
                await self._apply(self._place_in_lanes, "tenant_placed_in_lanes", tenant)
        self._placed_at.clear()

    def _quiet(self, tenant: str, now: float) -> bool:
        return now - self._heavy_at.get(tenant, now) > QUIET_SECONDS

    async def _apply(self, bind: Bind, event: str, tenant: str) -> bool:
        lane = self.home(tenant)
        try:
            await bind(tenant, lane)
        except BrokerUnavailable as exc:
            log.warning(f"{event}_failed", tenant=tenant, side_lane=lane, error=str(exc))
            return False
        log.info(event, tenant=tenant, side_lane=lane)
        return True
