"""PgStore: the PostgreSQL adapter (the per-step transaction itself is store/step.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from stepfleet.schemas import InstanceKey, InstanceStatus, JournalEntry
from stepfleet.store import statements as sql
from stepfleet.store.browse import Browse
from stepfleet.store.control import ControlTransaction
from stepfleet.store.dead_letters import DeadLetterStore
from stepfleet.store.errors import translated
from stepfleet.store.records import (
    CreatesWritten,
    DueTimer,
    GuardedCreate,
    GuardedWrite,
    HeldEvent,
    InstanceDetail,
    InstanceRecord,
    OutboxMessage,
    Unmoved,
)
from stepfleet.store.row_views import failed_attempt, held_event
from stepfleet.store.rows import (
    delete_outbox,
    journal_of,
    module_bytes,
    record_from_row,
)
from stepfleet.store.step import StepTransaction, created_params, guarded_params
from stepfleet.store.tables import instances, metadata, modules, step_attempts, tenant_modules
from stepfleet.store.tenants import TenantStore
from stepfleet.store.tokens import TokenStore

__all__ = ["STATISTICS_LOCK_KEY", "SWEEP_LOCK_KEY", "PgStore", "StepTransaction"]

SWEEP_LOCK_KEY = int.from_bytes(b"sf-sweep", "big")
"""The advisory lock (per database) that lets one worker at a time sweep for stalls."""
STATISTICS_LOCK_KEY = int.from_bytes(b"sf-stats", "big")
"""The advisory lock (per database) that lets one worker at a time analyze grown tables."""
_LEAST_PAGES_TO_ANALYZE = 16
"""Below this many pages (128 KiB) a table's plans are cheap whatever the planner believes."""


class PgStore:
    """The PostgreSQL store; one per process, sharing a small connection pool.

    `retention_seconds` is how long finished instances are kept unless their create said
    otherwise. `pre_ping` tests each connection with a round trip before lending it; a worker
    turns it off: its batches retry on StoreUnavailable anyway, and a lost connection makes
    SQLAlchemy discard the whole pool, so one batch pays for a restart instead of every
    statement paying a round trip.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        retention_seconds: int = 30 * 86400,
        pre_ping: bool = True,
        guarded_pool_size: int | None = None,
    ) -> None:
        """`guarded_pool_size`: connections kept for guarded writes (`write_unchanged`,
        `write_created`), one per batch a process writes at once; default half of
        `pool_size`."""
        self._engine: AsyncEngine = create_async_engine(
            url, pool_size=pool_size, max_overflow=2, pool_pre_ping=pre_ping
        )
        # The guarded writes' own pool, always in autocommit: switching a pooled connection
        # to autocommit and back costs two driver calls per statement.
        self._autocommit: AsyncEngine = create_async_engine(
            url,
            pool_size=guarded_pool_size or max(1, pool_size // 2),
            max_overflow=0,
            pool_pre_ping=pre_ping,
            isolation_level="AUTOCOMMIT",
        )
        event.listen(self._autocommit.sync_engine, "connect", _generic_plans)
        self._retention = retention_seconds
        self.tenants = TenantStore(self._engine)
        self.dead_letters = DeadLetterStore(self._engine)
        self.browse = Browse(self._engine)
        self.tokens = TokenStore(self._engine)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()
        await self._autocommit.dispose()

    async def write_unchanged(
        self, writes: Sequence[GuardedWrite], *, confirmed_outbox: Sequence[int] = ()
    ) -> dict[InstanceKey, int | None]:
        """Apply the writes whose rows are still as expected, in one statement (its own
        transaction); see StepStore.write_unchanged."""
        if not writes and not confirmed_outbox:
            return {}
        params = guarded_params(writes, confirmed_outbox, self._retention)
        async with translated(), self._autocommit.connect() as connection:
            # The statement is its own transaction: no BEGIN, no COMMIT round trips.
            rows = (await connection.execute(sql.WRITE_UNCHANGED, params)).all()
        applied = {InstanceKey(r.tenant, r.id) for r in rows if r.tenant is not None}
        ids = iter(sorted(r.outbox_id for r in rows if r.tenant is None))
        return {
            g.write.key: next(ids) if g.next_step is not None else None
            for g in writes
            if g.write.key in applied
        }

    async def write_created(
        self, creates: Sequence[GuardedCreate], *, confirmed_outbox: Sequence[int] = ()
    ) -> CreatesWritten:
        """Insert the creates' rows that do not exist yet with their first writes, in one
        statement (its own transaction); see StepStore.write_created."""
        if not creates:
            await self.delete_outbox(confirmed_outbox)
            return CreatesWritten()
        params = created_params(creates, confirmed_outbox, self._retention)
        async with translated(), self._autocommit.connect() as connection:
            rows = (await connection.execute(sql.WRITE_CREATED, params)).all()
        if not any(r.what == "calm" and r.n for r in rows):
            return CreatesWritten(busy=True)
        new = {InstanceKey(r.tenant, r.id) for r in rows if r.what == "new"}
        ids = iter(sorted(r.n for r in rows if r.what == "outbox"))
        return CreatesWritten(
            {
                c.new.key: next(ids) if c.next_step is not None else None
                for c in creates
                if c.new.key in new
            },
            {InstanceKey(r.tenant, r.id): r.module for r in rows if r.what == "old"},
            sum(r.n for r in rows if r.what == "adopted"),
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StepTransaction]:
        """Run a batch in one transaction, committed when the block exits cleanly."""
        async with translated(), self._engine.begin() as connection:
            yield StepTransaction(connection, retention_seconds=self._retention)

    @asynccontextmanager
    async def control(self) -> AsyncIterator[ControlTransaction]:
        """Run one operator action in one transaction."""
        async with translated(), self._engine.begin() as connection:
            yield ControlTransaction(connection, retention_seconds=self._retention)

    # -- timers and retention ------------------------------------------------------------

    async def due_timers(self, *, limit: int, resend_after_seconds: float) -> list[DueTimer]:
        """Claim parked instances whose timer is due, marking their wake as sent.

        Any worker may call this; SKIP LOCKED keeps two off the same rows, and a wake that
        was sent but never processed (lost, or its worker died) is sent again after
        `resend_after_seconds`.
        """
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(
                sql.DUE_TIMERS, {"limit": limit, "resend": resend_after_seconds}
            )
            return [
                DueTimer(
                    InstanceKey(row.tenant, row.id),
                    row.module,
                    row.position,
                    row.attempt,
                    row.generation,
                    row.wake_at,
                    row.traceparent,
                )
                for row in result
            ]

    @asynccontextmanager
    async def claim_unmoved(
        self, *, older_than_seconds: float, limit: int
    ) -> AsyncIterator[list[Unmoved] | None]:
        """Find live instances nothing moves: no timer, no outbox row, no stall mark, and
        neither progress nor a sweep for `older_than_seconds`; mark them swept.

        Yields None when another worker is sweeping (one at a time fleet-wide, by an advisory
        lock held for the transaction). The caller publishes their step messages inside the
        block; if that fails, nothing is marked swept.
        """
        async with translated(), self._engine.begin() as connection:
            got = await connection.execute(sql.TRY_XACT_LOCK, {"key": SWEEP_LOCK_KEY})
            if not got.scalar_one():
                yield None
                return
            result = await connection.execute(
                sql.SWEEP_STALLED, {"age": older_than_seconds, "limit": limit}
            )
            yield [
                Unmoved(
                    InstanceKey(row.tenant, row.id),
                    row.module,
                    row.position,
                    row.generation,
                    row.updated_at,
                )
                for row in result
            ]

    async def next_timer(self) -> datetime | None:
        """When the next timer that is not due yet will be (None: there is none); it may be a
        paused or stalled instance's, which `due_timers` leaves alone."""
        async with translated(), self._engine.connect() as connection:
            due: datetime | None = (await connection.execute(sql.NEXT_TIMER)).scalar_one()
            return due

    async def backlog(self) -> tuple[int, int]:
        """Return the timers past due whose instance has not taken its wake yet, and the
        outbox rows not deleted yet."""
        async with translated(), self._engine.connect() as connection:
            row = (await connection.execute(sql.BACKLOG)).one()
            return int(row.timers_due), int(row.outbox_waiting)

    async def refresh_statistics(self) -> list[str] | None:
        """ANALYZE the stepfleet tables that have doubled in size since their last analysis
        (see workers/statistics.py); return their names, or None when another worker is at
        it (one at a time fleet-wide, by an advisory lock held for the transaction)."""
        async with translated(), self._engine.begin() as connection:
            got = await connection.execute(sql.TRY_XACT_LOCK, {"key": STATISTICS_LOCK_KEY})
            if not got.scalar_one():
                return None
            grown = await connection.execute(
                sql.GROWN_TABLES,
                {"tables": sorted(metadata.tables), "least": _LEAST_PAGES_TO_ANALYZE},
            )
            names = [str(name) for name in grown.scalars() if name in metadata.tables]
            for name in names:
                # A name of our own metadata, checked above: never input.
                await connection.execute(text(f'ANALYZE "{name}"'))
            return names

    async def delete_expired(self, *, limit: int) -> int:
        """Delete up to `limit` finished instances past their retention; return how many."""
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(sql.DELETE_EXPIRED, {"limit": limit})
            return result.rowcount or 0

    # -- modules -------------------------------------------------------------------------

    async def put_module(self, tenant: str, digest: str, wasm: bytes) -> bool:
        """Store a module for a tenant; return False when the tenant already had it."""
        async with translated(), self._engine.begin() as connection:
            await connection.execute(
                insert(modules)
                .values(digest=digest, wasm=wasm, size_bytes=len(wasm))
                .on_conflict_do_nothing(constraint="pk_modules")
            )
            result = await connection.execute(
                insert(tenant_modules)
                .values(tenant=tenant, digest=digest)
                .on_conflict_do_nothing(constraint="pk_tenant_modules")
                .returning(tenant_modules.c.digest)
            )
            return result.first() is not None

    async def module_bytes(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Return the bytes of the stored modules among `digests`."""
        async with translated(), self._engine.connect() as connection:
            return await module_bytes(connection, digests)

    async def tenant_modules(self, tenant: str) -> list[tuple[str, int, datetime]]:
        """List a tenant's modules as (digest, size, pushed_at), newest first."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(
                select(tenant_modules.c.digest, modules.c.size_bytes, tenant_modules.c.pushed_at)
                .join(modules, modules.c.digest == tenant_modules.c.digest)
                .where(tenant_modules.c.tenant == tenant)
                .order_by(tenant_modules.c.pushed_at.desc())
            )
            return [(row.digest, row.size_bytes, row.pushed_at) for row in result]

    # -- reads ---------------------------------------------------------------------------

    async def find_instances(
        self, instance_id: str, tenant: str | None = None
    ) -> list[tuple[InstanceRecord, str]]:
        """Return the instances with this id (in one tenant, or in any), with their params."""
        query = select(instances).where(instances.c.id == instance_id)
        if tenant is not None:
            query = query.where(instances.c.tenant == tenant)
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(query.order_by(instances.c.tenant))
            return [(record_from_row(row), row.params) for row in result]

    async def journal(self, key: InstanceKey) -> list[JournalEntry]:
        """Return an instance's whole journal in order."""
        async with translated(), self._engine.connect() as connection:
            return await journal_of(connection, key)

    async def detail(self, key: InstanceKey) -> InstanceDetail | None:
        """Return an instance with its params, journal, failed attempts and stored events."""
        async with translated(), self._engine.connect() as connection:
            row = (
                await connection.execute(
                    select(instances).where(
                        instances.c.tenant == key.tenant, instances.c.id == key.instance_id
                    )
                )
            ).first()
            if row is None:
                return None
            entries = await journal_of(connection, key)
            attempts = await connection.execute(
                select(step_attempts)
                .where(
                    step_attempts.c.tenant == key.tenant,
                    step_attempts.c.instance_id == key.instance_id,
                )
                .order_by(step_attempts.c.seq, step_attempts.c.attempt)
            )
            waiting = await connection.execute(
                sql.WAITING_EVENTS, {"tenant": key.tenant, "id": key.instance_id}
            )
            return InstanceDetail(
                record=record_from_row(row),
                params=row.params,
                journal=entries,
                attempts=[failed_attempt(a._mapping) for a in attempts],
                pending_events=waiting.scalar_one(),
            )

    async def list_instances(
        self,
        tenant: str,
        *,
        statuses: Sequence[InstanceStatus] = (),
        module: str | None = None,
        stalled: bool = False,
        limit: int = 100,
    ) -> list[InstanceRecord]:
        """List a tenant's instances, newest first, optionally by status and module, or only
        those marked stalled."""
        query = select(instances).where(instances.c.tenant == tenant)
        if stalled:
            query = query.where(instances.c.stalled_letter.is_not(None))
        if statuses:
            query = query.where(instances.c.status.in_([s.value for s in statuses]))
        if module is not None:
            query = query.where(instances.c.module == module)
        query = query.order_by(instances.c.created_at.desc(), instances.c.id).limit(limit)
        async with translated(), self._engine.connect() as connection:
            return [record_from_row(row) for row in await connection.execute(query)]

    async def expire_early_events(self, *, limit: int) -> int:
        """Queue the dead letters of held early events whose hold has ended, in the outbox
        (dated when each event arrived, so the relay's next pass publishes them); return how
        many."""
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(sql.EXPIRE_EARLY_EVENTS, {"limit": limit})
            return len(result.all())

    async def held_events(self, key: InstanceKey) -> list[HeldEvent]:
        """The events held for an instance that does not exist (yet), oldest first."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(
                sql.HELD_EVENTS, {"tenant": key.tenant, "id": key.instance_id}
            )
            return [held_event(r._mapping) for r in result]

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        if ids:
            async with translated(), self._engine.begin() as connection:
                await delete_outbox(connection, ids)

    # -- outbox relay --------------------------------------------------------------------

    @asynccontextmanager
    async def claim_outbox(
        self, *, older_than_seconds: float, limit: int
    ) -> AsyncIterator[list[tuple[int, OutboxMessage]]]:
        """Lock outbox rows left behind by a crash; delete them if the block succeeds.

        The caller publishes them (with confirms) inside the block; any worker may run this,
        SKIP LOCKED keeps two workers off the same rows.
        """
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(
                sql.CLAIM_OUTBOX, {"age": older_than_seconds, "limit": limit}
            )
            claimed = [
                (
                    row.id,
                    OutboxMessage(row.routing_key, row.headers, bytes(row.body), row.exchange),
                )
                for row in result
            ]
            yield claimed
            await delete_outbox(connection, [i for i, _ in claimed])


def _generic_plans(connection: Any, _record: object) -> None:
    """The guarded write reads its rows from JSON parameters, whose values no plan can look
    into: its generic plan is the plan, and PostgreSQL's first custom plans only cost time
    (a SET rather than a startup option, which PgBouncer refuses)."""
    cursor = connection.cursor()
    cursor.execute("SET plan_cache_mode = force_generic_plan")
    cursor.close()
