"""The worker's inbox: deliveries wait here between the broker and the batches, one queue per
tenant, and a batch takes from the tenants in turn.

With one first-in-first-out queue, a tenant with a thousand deliveries waiting ahead of another
tenant's one makes that one wait for all of them; here it waits for at most one of each other
tenant's. The tenant is read from the routing key (`<tenant>.<kind>`, which the batch checks
against the headers): the inbox only orders work, it does not trust or refuse it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque

from stepfleet.broker import Delivery


def _tenant_of(delivery: Delivery) -> str:
    return delivery.routing_key.rpartition(".")[0]


class FairInbox:
    """Deliveries by tenant; `take` fills a batch round-robin over the tenants."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[tuple[Delivery, float]]] = OrderedDict()
        self._size = 0
        self.waited = 0.0
        """Seconds the deliveries taken so far waited here, summed."""
        self._arrived = asyncio.Event()

    def qsize(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self._size == 0

    def put_nowait(self, delivery: Delivery) -> None:
        """Queue a delivery behind its own tenant's."""
        tenant = _tenant_of(delivery)
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
        queue.append((delivery, time.monotonic()))
        self._size += 1
        self._arrived.set()

    async def take(self, most: int, wait_s: float) -> list[Delivery]:
        """Wait up to `wait_s` seconds for a delivery, then take up to `most` of what is
        here, one tenant's oldest after another's; [] when nothing came."""
        if not self._size:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait_s)
            except TimeoutError:
                return []
        batch: list[Delivery] = []
        now = time.monotonic()
        while self._size and len(batch) < most:
            tenant, queue = next(iter(self._queues.items()))
            delivery, arrived = queue.popleft()
            batch.append(delivery)
            self.waited += now - arrived
            self._size -= 1
            # The tenant goes to the back of the turn (or leaves it, when it has no more).
            del self._queues[tenant]
            if queue:
                self._queues[tenant] = queue
        return batch
