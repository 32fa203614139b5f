"""The stall sweep: a live instance that nothing moves gets its step message again.

Whether a step message is in flight cannot be read from PostgreSQL: it may be queued behind a
backlog, held unacked by a worker, or lost (a queue purged or deleted by hand, a message the
broker dropped before confirming after a failover). So the sweep takes age as the test. An
instance that is `queued` or `running`, not parked on a timer (sleep, retry, event timeout,
throttle: the timer loop moves those), not marked stalled (an operator's), with no outbox row
(the outbox relay moves those, including next steps a worker kept in memory) and with neither
progress nor a sweep for `STEPFLEET_STALL_AFTER_SECONDS`, gets its step message published
again. When the original was only slow, the copy is a duplicate by position and acked without
effect: that, one extra delivery, is the whole cost of a false positive.

Every worker runs the sweep, one at a time across the fleet (an advisory lock held by the
sweeping transaction); a worker that does not get the lock tries again next period.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import structlog

from stepfleet.broker import BrokerUnavailable, Outgoing, PublishRefused, Topology
from stepfleet.cycle.messages import step_message
from stepfleet.store import PgStore, StoreUnavailable

log = structlog.get_logger("stepfleet.sweep")

_PER_SWEEP = 500
"""Instances republished at most per sweep: a wrong setting costs bounded duplicates."""


class StallSweep:
    """Periodically republishes the step message of live instances nothing moves."""

    def __init__(
        self,
        store: PgStore,
        topology: Topology,
        publish: Callable[[Sequence[Outgoing]], Awaitable[None]],
        *,
        stall_after_seconds: float,
        every_seconds: float,
    ) -> None:
        self._store = store
        self._topology = topology
        self._publish = publish
        self._after = stall_after_seconds
        self._every = every_seconds
        self.swept = 0
        """Instances whose step this worker published again."""
        self.sweeps = 0
        """Sweeps this worker ran (it held the fleet's sweep lock)."""

    async def run(self) -> None:
        """Sweep every period until cancelled; a failed sweep is logged and tried again."""
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.sweep()
            except (StoreUnavailable, BrokerUnavailable, PublishRefused) as exc:
                log.warning("stall_sweep_failed", error=str(exc))
            except Exception:
                log.exception("stall_sweep_failed")

    async def sweep(self) -> int:
        """One sweep; return how many instances got their step message again."""
        async with self._store.claim_unmoved(
            older_than_seconds=self._after, limit=_PER_SWEEP
        ) as found:
            if found is None:
                return 0
            self.sweeps += 1
            if not found:
                return 0
            messages = [
                step_message(self._topology, u.key, u.module, u.position, u.generation)[1]
                for u in found
            ]
            await self._publish(messages)
        now = datetime.now(UTC)
        for unmoved in found:
            idle = (now - unmoved.updated_at).total_seconds()
            log.warning(
                "instance_unmoved_step_republished",
                tenant=unmoved.key.tenant,
                instance=unmoved.key.instance_id,
                module_digest=unmoved.module,
                position=unmoved.position,
                generation=unmoved.generation,
                idle_seconds=round(idle, 1),
            )
        self.swept += len(found)
        return len(found)
