"""Planner statistics kept in step with tables that grow faster than autovacuum looks.

Workers send their statements as prepared statements, and PostgreSQL keeps the generic plan
it chose for one until the statistics of a table it reads change. A plan chosen while
`instances` held a few hundred rows scans the table where an index lookup is due; after a burst
of 100,000 creates it still does, for every batch, until autovacuum next analyzes the table (a
minute or more later; never where autovacuum is off). Measured on 2 workers taking in 100,000
creates: 500 creates/s falling to 320 as the table grew, 1,840-2,110 at once after an ANALYZE.

So every `EVERY_SECONDS` one worker of the fleet (an advisory lock) analyzes the stepfleet
tables that have at least doubled in pages since PostgreSQL last analyzed them; the ANALYZE
invalidates every session's plans over that table, which are planned again with its size. A
table is analyzed about once per doubling, some twenty times from 128 KiB to 200 GiB;
autovacuum still does the rest (vacuuming, and statistics of tables that change without
growing).
"""

from __future__ import annotations

import asyncio

import structlog

from stepfleet.store import PgStore, StoreUnavailable

log = structlog.get_logger("stepfleet.statistics")

EVERY_SECONDS = 5.0


class PlannerStatistics:
    """Periodically analyzes the stepfleet tables that doubled since their last analysis."""

    def __init__(self, store: PgStore, *, every_seconds: float = EVERY_SECONDS) -> None:
        self._store = store
        self._every = every_seconds
        self.analyzed = 0
        """Tables this worker analyzed."""

    async def run(self) -> None:
        """Refresh every period until cancelled; a failed refresh is logged and tried again."""
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.refresh()
            except StoreUnavailable as exc:
                log.warning("statistics_refresh_failed", error=str(exc))
            except Exception:
                log.exception("statistics_refresh_failed")

    async def refresh(self) -> list[str]:
        """Analyze the grown tables now (unless another worker is at it); return their names."""
        tables = await self._store.refresh_statistics() or []
        if tables:
            self.analyzed += len(tables)
            log.info("statistics_refreshed", tables=tables)
        return tables
