"""PgStore: the PostgreSQL adapter.

The per-step path works on whole batches: every statement in StepTransaction takes arrays
(`unnest`), so a batch of deliveries costs a handful of round trips whatever its size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from stepfleet.schemas import EntryKind, InstanceKey, InstanceStatus, JournalEntry
from stepfleet.store.errors import translated
from stepfleet.store.records import (
    InstanceRecord,
    NewInstance,
    OutboxMessage,
    StepWrite,
)
from stepfleet.store.tables import instances, journal, modules, tenant_modules

_INSERT_INSTANCES = text(
    """
    INSERT INTO instances (tenant, id, module, status, params)
    SELECT t, i, m, 'running', p
    FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]),
                CAST(:modules AS text[]), CAST(:params AS text[])) AS n(t, i, m, p)
    ON CONFLICT ON CONSTRAINT pk_instances DO NOTHING
    RETURNING tenant, id
    """
)

_LOCK_INSTANCES = text(
    """
    SELECT tenant, id, module, status, position, generation FROM instances
    WHERE (tenant, id) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))
    ORDER BY tenant, id
    FOR UPDATE
    """
)

_OWNED_MODULES = text(
    """
    SELECT tenant, digest FROM tenant_modules
    WHERE (tenant, digest) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:digests AS text[])))
    """
)

_PARAMS = text(
    """
    SELECT tenant, id, params FROM instances
    WHERE (tenant, id) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))
    """
)

_JOURNAL_SINCE = text(
    """
    SELECT j.tenant, j.instance_id, j.seq, j.kind, j.name, j.value, j.attempt,
           j.started_at, j.finished_at
    FROM journal AS j
    JOIN unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:froms AS int[]))
         AS r(tenant, instance_id, from_seq)
      ON j.tenant = r.tenant AND j.instance_id = r.instance_id AND j.seq >= r.from_seq
    ORDER BY j.tenant, j.instance_id, j.seq
    """
)

# Everything a batch writes, in one statement: forget confirmed outbox rows, append journal
# entries, move instance states, queue the next messages. Empty arrays make empty parts.
_WRITE_BATCH = text(
    """
    WITH confirmed AS (
        DELETE FROM outbox WHERE id = ANY(CAST(:confirmed AS bigint[]))
    ),
    entries AS (
        INSERT INTO journal (tenant, instance_id, seq, kind, name, value, attempt,
                             started_at, finished_at)
        SELECT * FROM unnest(CAST(:j_tenants AS text[]), CAST(:j_ids AS text[]),
                             CAST(:seqs AS int[]), CAST(:kinds AS smallint[]),
                             CAST(:names AS text[]), CAST(:vals AS text[]),
                             CAST(:attempts AS int[]), CAST(:starts AS timestamptz[]),
                             CAST(:ends AS timestamptz[]))
    ),
    states AS (
        UPDATE instances AS i
        SET status = u.status, position = u.position, output = u.output, error = u.error,
            updated_at = now()
        FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:statuses AS text[]),
                    CAST(:positions AS int[]), CAST(:outputs AS text[]),
                    CAST(:errors AS text[])) AS u(tenant, id, status, position, output, error)
        WHERE i.tenant = u.tenant AND i.id = u.id
    )
    INSERT INTO outbox (routing_key, headers, body)
    SELECT * FROM unnest(CAST(:keys AS text[]), CAST(:headers AS text[]),
                         CAST(:bodies AS bytea[]))
    RETURNING id
    """
)

_DELETE_OUTBOX = text("DELETE FROM outbox WHERE id = ANY(CAST(:ids AS bigint[]))")

_CLAIM_OUTBOX = text(
    """
    SELECT id, routing_key, headers, body FROM outbox
    WHERE created_at < now() - make_interval(secs => :age)
    ORDER BY id LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)


def _split(keys: Iterable[InstanceKey]) -> dict[str, list[str]]:
    keys = list(keys)
    return {"tenants": [k.tenant for k in keys], "ids": [k.instance_id for k in keys]}


def _entry(row: Any) -> JournalEntry:
    return JournalEntry(
        seq=row.seq,
        kind=EntryKind(row.kind),
        name=row.name,
        value=row.value,
        attempt=row.attempt,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _record(row: Any) -> InstanceRecord:
    """Build an instance record from a row that has at least the locked columns."""
    mapping = row._mapping
    return InstanceRecord(
        key=InstanceKey(row.tenant, row.id),
        module=row.module,
        status=InstanceStatus(row.status),
        position=row.position,
        generation=row.generation,
        output=mapping.get("output"),
        error=mapping.get("error"),
        created_at=mapping.get("created_at"),
        updated_at=mapping.get("updated_at"),
    )


class StepTransaction:
    """One transaction of the per-step path, covering a whole batch of deliveries."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._conn = connection

    async def create_instances(self, new: Sequence[NewInstance]) -> set[InstanceKey]:
        """Insert instances that do not exist yet; return the keys actually inserted."""
        if not new:
            return set()
        result = await self._conn.execute(
            _INSERT_INSTANCES,
            {
                **_split(n.key for n in new),
                "modules": [n.module for n in new],
                "params": [n.params for n in new],
            },
        )
        return {InstanceKey(row.tenant, row.id) for row in result}

    async def lock_instances(
        self, keys: Iterable[InstanceKey]
    ) -> dict[InstanceKey, InstanceRecord]:
        """Lock the rows (in key order, so batches never deadlock) and return them."""
        result = await self._conn.execute(_LOCK_INSTANCES, _split(keys))
        return {InstanceKey(row.tenant, row.id): _record(row) for row in result}

    async def owned_modules(self, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Return which (tenant, digest) pairs the tenant has pushed."""
        if not pairs:
            return set()
        listed = list(pairs)
        result = await self._conn.execute(
            _OWNED_MODULES,
            {"tenants": [p[0] for p in listed], "digests": [p[1] for p in listed]},
        )
        return {(row.tenant, row.digest) for row in result}

    async def module_bytes(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Return the bytes of the stored modules among `digests`."""
        wanted = list(digests)
        if not wanted:
            return {}
        result = await self._conn.execute(
            select(modules.c.digest, modules.c.wasm).where(modules.c.digest.in_(wanted))
        )
        return {row.digest: bytes(row.wasm) for row in result}

    async def replay_data(
        self, since: dict[InstanceKey, int], *, with_params: Iterable[InstanceKey]
    ) -> tuple[dict[InstanceKey, str], dict[InstanceKey, list[JournalEntry]]]:
        """Return params for `with_params` and the journal of each key from its position on."""
        params: dict[InstanceKey, str] = {}
        wanted = list(with_params)
        if wanted:
            result = await self._conn.execute(_PARAMS, _split(wanted))
            params = {InstanceKey(row.tenant, row.id): row.params for row in result}
        entries: dict[InstanceKey, list[JournalEntry]] = {key: [] for key in since}
        if since:
            result = await self._conn.execute(
                _JOURNAL_SINCE, {**_split(since), "froms": list(since.values())}
            )
            for row in result:
                entries[InstanceKey(row.tenant, row.instance_id)].append(_entry(row))
        return params, entries

    async def write_batch(
        self,
        writes: Sequence[StepWrite],
        outbox: Sequence[OutboxMessage],
        *,
        confirmed_outbox: Sequence[int] = (),
    ) -> list[int]:
        """Write a batch's journal entries, instance states and outbox rows in one statement.

        Also deletes `confirmed_outbox` (rows whose publish the broker confirmed earlier).
        Returns the new outbox ids in the order of `outbox`.
        """
        if not writes and not outbox and not confirmed_outbox:
            return []
        appended = [w for w in writes if w.entry is not None]
        entries = [w.entry for w in appended if w.entry is not None]
        j_keys = _split(w.key for w in appended)
        result = await self._conn.execute(
            _WRITE_BATCH,
            {
                "confirmed": list(confirmed_outbox),
                "j_tenants": j_keys["tenants"],
                "j_ids": j_keys["ids"],
                "seqs": [e.seq for e in entries],
                "kinds": [int(e.kind) for e in entries],
                "names": [e.name for e in entries],
                "vals": [e.value for e in entries],
                "attempts": [e.attempt for e in entries],
                "starts": [e.started_at for e in entries],
                "ends": [e.finished_at for e in entries],
                **_split(w.key for w in writes),
                "statuses": [w.status.value for w in writes],
                "positions": [w.position for w in writes],
                "outputs": [w.output for w in writes],
                "errors": [w.error for w in writes],
                "keys": [m.routing_key for m in outbox],
                "headers": [m.headers for m in outbox],
                "bodies": [m.body for m in outbox],
            },
        )
        # INSERT ... SELECT FROM unnest keeps the input order for a serial id.
        return sorted(row.id for row in result)

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        if ids:
            await self._conn.execute(_DELETE_OUTBOX, {"ids": list(ids)})


class PgStore:
    """The PostgreSQL store; one per process, sharing a small connection pool."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self._engine: AsyncEngine = create_async_engine(
            url, pool_size=pool_size, max_overflow=4, pool_pre_ping=True
        )

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StepTransaction]:
        """Run a batch in one transaction, committed when the block exits cleanly."""
        async with translated(), self._engine.begin() as connection:
            yield StepTransaction(connection)

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
        wanted = list(digests)
        if not wanted:
            return {}
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(
                select(modules.c.digest, modules.c.wasm).where(modules.c.digest.in_(wanted))
            )
            return {row.digest: bytes(row.wasm) for row in result}

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
            return [(_record(row), row.params) for row in result]

    async def journal(self, key: InstanceKey) -> list[JournalEntry]:
        """Return an instance's whole journal in order."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(
                select(journal)
                .where(journal.c.tenant == key.tenant, journal.c.instance_id == key.instance_id)
                .order_by(journal.c.seq)
            )
            return [_entry(row) for row in result]

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
                _CLAIM_OUTBOX, {"age": older_than_seconds, "limit": limit}
            )
            claimed = [
                (row.id, OutboxMessage(row.routing_key, row.headers, bytes(row.body)))
                for row in result
            ]
            yield claimed
            if claimed:
                await connection.execute(_DELETE_OUTBOX, {"ids": [i for i, _ in claimed]})
