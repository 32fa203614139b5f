"""The worker's inbox: deliveries wait here between the broker and the batches, one queue per
tenant, and batches take from the tenants by weighted fair queuing.

With one first-in-first-out queue, a tenant with a thousand deliveries waiting ahead of another
tenant's one makes that one wait for all of them. Here each tenant has a *pass*, a virtual time
that goes up by 1/weight for every delivery taken from it (and for every step chained to one,
`charge`), and a batch takes one delivery at a
time from the waiting tenant with the lowest pass: tenants with work waiting share the batches
in proportion to their weights (`TenantLimits.weight`), and a tenant that comes back after a
quiet spell starts at the current virtual time, so it neither saved up a credit nor waits for
anyone's backlog.

Within a tenant, the work of its instances that exist already (steps, wakes, events) goes
before its creates: a tenant that publishes 100,000 creates at once has them fill its queue, and
the wakes of its sleeping workflows and the next steps of its running ones would wait behind
every create the worker took in. Creates still get one turn in `STEPS_PER_CREATE + 1` while the
tenant has both, so a tenant whose running workflows keep its share busy still starts new ones.

A tenant with only a few deliveries waiting (`light_limit` or fewer) is *light*: it asks less
than its share. `take_light` takes from light tenants only, for a worker pipeline kept for them,
so their steps do not wait for a heavy tenant's large batches to finish (max-min fairness: a
tenant asking less than its share gets all it asks). The tenant is read from the routing key
(`<tenant>.<kind>`, which the batch checks against the headers): the inbox only orders work, it
does not trust or refuse it.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from stepfleet.broker import Delivery

LIGHT_LIMIT = 4
"""Deliveries a tenant may have waiting in one worker and still count as light."""
STEPS_PER_CREATE = 3
"""Deliveries of existing instances a tenant's queue serves in a row while creates wait."""


def tenant_of(delivery: Delivery) -> str:
    """The tenant a delivery's routing key (`<tenant>.<kind>`) names."""
    return delivery.routing_key.rpartition(".")[0]


def _one(tenant: str) -> int:
    return 1


class _Queue:
    """A tenant's deliveries with their arrival times: its existing instances' work first,
    its creates at least one turn in `STEPS_PER_CREATE + 1`."""

    __slots__ = ("creates", "going", "streak")

    def __init__(self) -> None:
        self.going: deque[tuple[Delivery, float]] = deque()
        self.creates: deque[tuple[Delivery, float]] = deque()
        self.streak = 0
        """Deliveries taken from `going` in a row while creates waited."""

    def __len__(self) -> int:
        return len(self.going) + len(self.creates)

    def append(self, item: tuple[Delivery, float]) -> None:
        create = item[0].routing_key.endswith(".create")
        (self.creates if create else self.going).append(item)

    def popleft(self) -> tuple[Delivery, float]:
        if self.going and (not self.creates or self.streak < STEPS_PER_CREATE):
            self.streak = self.streak + 1 if self.creates else 0
            return self.going.popleft()
        self.streak = 0
        return self.creates.popleft()


class _Tenant:
    __slots__ = ("light", "name", "passed", "queue", "scheduled")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue = _Queue()
        self.passed = 0.0
        self.light = False
        self.scheduled = False
        """Whether the heap holds an entry for this tenant (one at most)."""


class FairInbox:
    """Deliveries by tenant; `take` fills a batch by weighted fair queuing over the tenants,
    `take_light` from light tenants only."""

    def __init__(
        self, weight: Callable[[str], int] = _one, *, light_limit: int = LIGHT_LIMIT
    ) -> None:
        self._weight = weight
        self._light_limit = light_limit
        self._tenants: dict[str, _Tenant] = {}
        self._waiting: list[tuple[float, int, _Tenant]] = []
        """Heap of the tenants with deliveries, by pass (then by when they came); an entry
        whose tenant `take_light` emptied meanwhile is skipped when reached."""
        self._light: dict[str, _Tenant] = {}
        """Tenants with deliveries waiting, `light_limit` or fewer, oldest first."""
        self._order = 0
        self._now = 0.0
        """Virtual time: the pass of the tenant served last."""
        self._size = 0
        self._serving_light = 0
        self._forget_past = 4096
        self.waited = 0.0
        """Seconds the deliveries taken so far waited here, summed."""
        self._arrived = asyncio.Event()
        self._light_arrived = asyncio.Event()

    def qsize(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self._size == 0

    def waiting(self, tenant: str) -> int:
        """Deliveries of `tenant` waiting here."""
        known = self._tenants.get(tenant)
        return len(known.queue) if known is not None else 0

    def put_nowait(self, delivery: Delivery) -> None:
        """Queue a delivery behind its own tenant's (a create behind its creates)."""
        name = tenant_of(delivery)
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = self._tenants[name] = _Tenant(name)
        if not tenant.queue:
            # Back after a quiet spell: from now on, without credit for the time away.
            tenant.passed = max(tenant.passed, self._now)
        if not tenant.scheduled:
            self._schedule(tenant)
        tenant.queue.append((delivery, time.monotonic()))
        self._size += 1
        self._classify(tenant)
        self._arrived.set()

    async def take(self, most: int, wait_s: float, *, leave_light: int = 0) -> list[Delivery]:
        """Wait up to `wait_s` seconds for a delivery, then take up to `most` of what is
        here, by weighted fair queuing over the tenants; [] when nothing came.

        Light tenants' deliveries are left to `take_light` while there are at most
        `leave_light` of them and no light batch is being served (`serving_light`): a batch
        of their own is done sooner than a large one.
        """
        deadline = time.monotonic() + wait_s
        while self._size <= self._reserved(leave_light):
            if not await self._wait(self._arrived, deadline - time.monotonic()):
                return []
        reserved = self._reserved(leave_light)
        left: list[_Tenant] = []
        batch: list[Delivery] = []
        now = time.monotonic()
        while self._waiting and len(batch) < most:
            passed, _, tenant = heapq.heappop(self._waiting)
            tenant.scheduled = False
            if not tenant.queue:
                continue
            if reserved and tenant.light:
                left.append(tenant)
                continue
            if tenant.passed > passed:
                # Charged since it was scheduled (or left while `take_light` emptied it):
                # back in at its pass.
                self._schedule(tenant)
                continue
            self._now = max(self._now, passed)
            batch.append(self._pop(tenant, now))
            tenant.passed = passed + 1.0 / max(self._weight(tenant.name), 1)
            if tenant.queue:
                self._schedule(tenant)
        for tenant in left:
            self._schedule(tenant)
        return batch

    def charge(self, tenant: str, deliveries: int) -> None:
        """Count `deliveries` more against a tenant's share: work a batch did for it beyond
        its deliveries (the steps it chained to theirs, cycle/chain.py), so that shares
        follow the steps done, not the messages taken."""
        known = self._tenants.get(tenant)
        if known is not None and deliveries > 0:
            known.passed += deliveries / max(self._weight(tenant), 1)

    @contextmanager
    def serving_light(self) -> Iterator[None]:
        """While the block runs (a batch `take_light` took), `take` leaves nothing to
        `take_light`: a light batch that takes long (a module compiling, a lock) must not
        hold up the light deliveries that come meanwhile."""
        self._serving_light += 1
        self._arrived.set()  # `take`s waiting for such deliveries may have them now
        try:
            yield
        finally:
            self._serving_light -= 1

    def _reserved(self, leave_light: int) -> int:
        """Deliveries `take` leaves to `take_light`: the light tenants' (at least one each),
        unless there are more than `leave_light` or a light batch is being served."""
        if self._serving_light or len(self._light) > leave_light:
            return 0
        waiting = sum(len(tenant.queue) for tenant in self._light.values())
        return waiting if waiting <= leave_light else 0

    def _schedule(self, tenant: _Tenant) -> None:
        self._order += 1
        heapq.heappush(self._waiting, (tenant.passed, self._order, tenant))
        tenant.scheduled = True

    async def take_light(self, most: int, wait_s: float) -> list[Delivery]:
        """Wait up to `wait_s` seconds for a light tenant's delivery, then take up to `most`
        of the light tenants' deliveries, one tenant's next after another's."""
        if not self._light and not await self._wait(self._light_arrived, wait_s):
            return []
        batch: list[Delivery] = []
        now = time.monotonic()
        while self._light and len(batch) < most:
            tenant = next(iter(self._light.values()))
            batch.append(self._pop(tenant, now))
            if tenant.light:  # to the back of the light tenants' turn
                del self._light[tenant.name]
                self._light[tenant.name] = tenant
        return batch

    def _pop(self, tenant: _Tenant, now: float) -> Delivery:
        delivery, arrived = tenant.queue.popleft()
        self.waited += now - arrived
        self._size -= 1
        self._classify(tenant)
        return delivery

    def _classify(self, tenant: _Tenant) -> None:
        light = 0 < len(tenant.queue) <= self._light_limit
        if light and not tenant.light:
            self._light[tenant.name] = tenant
            self._light_arrived.set()
        elif tenant.light and not light:
            del self._light[tenant.name]
        tenant.light = light
        if not tenant.queue and len(self._tenants) > self._forget_past:
            self._forget_idle()

    def _forget_idle(self) -> None:
        """Keep the tenant table bounded: tenants with nothing waiting and no pass ahead of
        the virtual time (nothing owed to remember) are dropped."""
        self._tenants = {
            name: t for name, t in self._tenants.items() if t.queue or t.passed > self._now
        }
        self._forget_past = max(4096, 2 * len(self._tenants))

    @staticmethod
    async def _wait(event: asyncio.Event, wait_s: float) -> bool:
        if wait_s <= 0:
            return False
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), wait_s)
        except TimeoutError:
            return False
        return True
