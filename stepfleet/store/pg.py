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

from stepfleet.schemas import (
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    Waiting,
)
from stepfleet.store.control import ControlTransaction
from stepfleet.store.dead_letters import DeadLetterStore
from stepfleet.store.errors import translated
from stepfleet.store.records import (
    DueTimer,
    InstanceDetail,
    InstanceRecord,
    NewEvent,
    NewInstance,
    OutboxMessage,
    StepWrite,
)
from stepfleet.store.rows import (
    STATE_COLUMNS,
    entry_from_row,
    record_from_row,
    split_keys,
    take_events,
)
from stepfleet.store.tables import instances, journal, modules, step_attempts, tenant_modules
from stepfleet.store.tenants import TenantStore

_INSERT_INSTANCES = text(
    """
    INSERT INTO instances (tenant, id, module, status, params, retention_seconds, state_bytes)
    SELECT t, i, m, 'running', p, r, octet_length(p)
    FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]),
                CAST(:modules AS text[]), CAST(:params AS text[]), CAST(:retentions AS int[]))
         AS n(t, i, m, p, r)
    ON CONFLICT ON CONSTRAINT pk_instances DO NOTHING
    RETURNING tenant, id
    """
)

# STATE_COLUMNS is a constant column list, not input.
_LOCK_INSTANCES = text(
    f"SELECT {STATE_COLUMNS} FROM instances "  # noqa: S608
    "WHERE (tenant, id) IN ("
    " SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))"
    " ORDER BY tenant, id FOR UPDATE"
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
           j.started_at, j.finished_at, j.flags
    FROM journal AS j
    JOIN unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:froms AS int[]))
         AS r(tenant, instance_id, from_seq)
      ON j.tenant = r.tenant AND j.instance_id = r.instance_id AND j.seq >= r.from_seq
    ORDER BY j.tenant, j.instance_id, j.seq
    """
)

# Everything a batch writes, in one statement: forget confirmed outbox rows, append journal
# entries and failed attempts, move instance states, queue the next messages. Empty arrays make
# empty parts.
_WRITE_BATCH = text(
    """
    WITH confirmed AS (
        DELETE FROM outbox WHERE id = ANY(CAST(:confirmed AS bigint[]))
    ),
    entries AS (
        INSERT INTO journal (tenant, instance_id, seq, kind, name, value, attempt,
                             started_at, finished_at, flags)
        SELECT * FROM unnest(CAST(:j_tenants AS text[]), CAST(:j_ids AS text[]),
                             CAST(:seqs AS int[]), CAST(:kinds AS smallint[]),
                             CAST(:names AS text[]), CAST(:vals AS text[]),
                             CAST(:attempts AS int[]), CAST(:starts AS timestamptz[]),
                             CAST(:ends AS timestamptz[]), CAST(:flags AS smallint[]))
    ),
    failures AS (
        INSERT INTO step_attempts (tenant, instance_id, seq, attempt, name, error,
                                   started_at, finished_at)
        SELECT * FROM unnest(CAST(:a_tenants AS text[]), CAST(:a_ids AS text[]),
                             CAST(:a_seqs AS int[]), CAST(:a_attempts AS int[]),
                             CAST(:a_names AS text[]), CAST(:a_errors AS text[]),
                             CAST(:a_starts AS timestamptz[]), CAST(:a_ends AS timestamptz[]))
    ),
    states AS (
        UPDATE instances AS i
        SET status = u.status, position = u.position, attempt = u.attempt,
            wait_kind = u.wait_kind, wait_name = u.wait_name, wait_event = u.wait_event,
            wait_timeout_ms = u.wait_timeout_ms, wake_at = u.wake_at, wake_sent_at = NULL,
            mode = u.mode, end_status = u.end_status, output = u.output, error = u.error,
            state_bytes = u.state_bytes, updated_at = now(),
            finished_at = CASE WHEN u.status IN ('complete', 'errored', 'terminated')
                               THEN now() END,
            retain_until = CASE WHEN u.status IN ('complete', 'errored', 'terminated')
                THEN now() + make_interval(secs => coalesce(i.retention_seconds, :retention))
                END
        FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:statuses AS text[]),
                    CAST(:positions AS int[]), CAST(:u_attempts AS int[]),
                    CAST(:wait_kinds AS text[]), CAST(:wait_names AS text[]),
                    CAST(:wait_events AS text[]), CAST(:wait_timeouts AS bigint[]),
                    CAST(:wake_ats AS timestamptz[]), CAST(:modes AS smallint[]),
                    CAST(:end_statuses AS text[]), CAST(:outputs AS text[]),
                    CAST(:errors AS text[]), CAST(:state_bytes AS bigint[]))
             AS u(tenant, id, status, position, attempt, wait_kind, wait_name, wait_event,
                  wait_timeout_ms, wake_at, mode, end_status, output, error, state_bytes)
        WHERE i.tenant = u.tenant AND i.id = u.id
    )
    INSERT INTO outbox (routing_key, headers, body)
    SELECT * FROM unnest(CAST(:keys AS text[]), CAST(:headers AS text[]),
                         CAST(:bodies AS bytea[]))
    RETURNING id
    """
)

# Take up to :need of the tenant's :cap running-step slots for this transaction; the locks are
# the slots, held by whichever workers' transactions run the tenant's steps right now.
_GRANT_SLOTS = text(
    """
    SELECT count(*) FROM (
        SELECT slot
        FROM (SELECT slot_key FROM tenants WHERE name = :tenant) AS t
        CROSS JOIN generate_series(0, :cap - 1) AS slot
        WHERE pg_try_advisory_xact_lock(t.slot_key, slot)
        LIMIT :need
    ) AS taken
    """
)

# A token bucket shared by every worker, holding up to a second's worth (at least one token).
# Every step asked for takes a token, now or from the future: the bucket goes negative by the
# steps held back, which is their place in the line.
_TAKE_TOKENS = text(
    """
    INSERT INTO tenant_rates AS r (tenant, tokens, updated_at)
    VALUES (:tenant, GREATEST(:rate, 1) - :need, now())
    ON CONFLICT (tenant) DO UPDATE SET
        tokens = LEAST(GREATEST(:rate, 1),
                       r.tokens + :rate * EXTRACT(EPOCH FROM now() - r.updated_at)) - :need,
        updated_at = now()
    RETURNING tokens + :need AS before
    """
)

_KNOWN_EVENTS = text(
    """
    SELECT e.tenant, e.instance_id FROM events AS e
    JOIN unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:event_ids AS text[]))
         AS k(tenant, instance_id, event_id)
      ON e.tenant = k.tenant AND e.instance_id = k.instance_id AND e.event_id = k.event_id
    """
)

_INSERT_EVENTS = text(
    """
    INSERT INTO events (tenant, instance_id, event_id, type, payload, consumed_seq)
    SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]),
                         CAST(:event_ids AS text[]), CAST(:types AS text[]),
                         CAST(:payloads AS text[]), CAST(:consumed AS int[]))
    ON CONFLICT ON CONSTRAINT pk_events DO NOTHING
    RETURNING tenant, instance_id
    """
)

_DELETE_OUTBOX = text("DELETE FROM outbox WHERE id = ANY(CAST(:ids AS bigint[]))")

_CLAIM_OUTBOX = text(
    """
    SELECT id, exchange, routing_key, headers, body FROM outbox
    WHERE created_at < now() - make_interval(secs => :age)
    ORDER BY id LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)


def _waiting_columns(waiting: Waiting | None) -> dict[str, Any]:
    if waiting is None:
        return {"kind": None, "name": None, "event": None, "timeout": None, "wake_at": None}
    return {
        "kind": waiting.kind.value,
        "name": waiting.name,
        "event": waiting.event_type,
        "timeout": waiting.timeout_ms,
        "wake_at": waiting.wake_at,
    }


class StepTransaction:
    """One transaction of the per-step path, covering a whole batch of deliveries."""

    def __init__(self, connection: AsyncConnection, *, retention_seconds: int) -> None:
        self._conn = connection
        self._retention = retention_seconds

    async def create_instances(self, new: Sequence[NewInstance]) -> set[InstanceKey]:
        """Insert instances that do not exist yet; return the keys actually inserted."""
        if not new:
            return set()
        result = await self._conn.execute(
            _INSERT_INSTANCES,
            {
                **split_keys(n.key for n in new),
                "modules": [n.module for n in new],
                "params": [n.params for n in new],
                "retentions": [n.retention_seconds for n in new],
            },
        )
        return {InstanceKey(row.tenant, row.id) for row in result}

    async def lock_instances(
        self, keys: Iterable[InstanceKey]
    ) -> dict[InstanceKey, InstanceRecord]:
        """Lock the rows (in key order, so batches never deadlock) and return them."""
        result = await self._conn.execute(_LOCK_INSTANCES, split_keys(keys))
        return {InstanceKey(row.tenant, row.id): record_from_row(row) for row in result}

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
            result = await self._conn.execute(_PARAMS, split_keys(wanted))
            params = {InstanceKey(row.tenant, row.id): row.params for row in result}
        entries: dict[InstanceKey, list[JournalEntry]] = {key: [] for key in since}
        if since:
            result = await self._conn.execute(
                _JOURNAL_SINCE, {**split_keys(since), "froms": list(since.values())}
            )
            for row in result:
                entries[InstanceKey(row.tenant, row.instance_id)].append(entry_from_row(row))
        return params, entries

    async def grant_slots(self, tenant: str, cap: int, need: int) -> int:
        """Take up to `need` of a tenant's `cap` running-step slots until commit.

        A slot is the advisory lock (the tenant's `slot_key`, slot number); a tenant without a
        row has no limits, so none."""
        result = await self._conn.execute(
            _GRANT_SLOTS, {"tenant": tenant, "cap": cap, "need": need}
        )
        return int(result.scalar_one())

    async def take_tokens(self, tenant: str, per_second: float, need: int) -> float:
        """Take `need` tokens of the tenant's shared bucket; return the tokens there were.

        The first whole tokens there were are spent now; the rest are taken from the future,
        so a step held back is already paid for when its turn comes.
        """
        result = await self._conn.execute(
            _TAKE_TOKENS, {"tenant": tenant, "rate": per_second, "need": need}
        )
        return float(result.scalar_one())

    async def known_events(self, events: Sequence[tuple[InstanceKey, str]]) -> set[InstanceKey]:
        """Of (instance, event id) pairs, the instances that already received that event."""
        if not events:
            return set()
        result = await self._conn.execute(
            _KNOWN_EVENTS,
            {**split_keys(k for k, _ in events), "event_ids": [e for _, e in events]},
        )
        return {InstanceKey(row.tenant, row.instance_id) for row in result}

    async def insert_events(self, events: Sequence[NewEvent]) -> set[InstanceKey]:
        """Store events; return the keys whose event was new (the rest are repeats)."""
        if not events:
            return set()
        result = await self._conn.execute(
            _INSERT_EVENTS,
            {
                **split_keys(e.key for e in events),
                "event_ids": [e.event_id for e in events],
                "types": [e.type for e in events],
                "payloads": [e.payload for e in events],
                "consumed": [e.consumed_seq for e in events],
            },
        )
        return {InstanceKey(row.tenant, row.instance_id) for row in result}

    async def take_events(
        self, waits: Sequence[tuple[InstanceKey, str, int]]
    ) -> dict[InstanceKey, tuple[str, datetime]]:
        """For each (instance, event type, position) wait, take the oldest stored event.

        Returns the payload and arrival time of each event taken, by instance.
        """
        return await take_events(self._conn, waits)

    async def write_batch(
        self,
        writes: Sequence[StepWrite],
        outbox: Sequence[OutboxMessage],
        *,
        confirmed_outbox: Sequence[int] = (),
    ) -> list[int]:
        """Write a batch's journal entries, attempts, instance states and outbox rows at once.

        Also deletes `confirmed_outbox` (rows whose publish the broker confirmed earlier).
        Returns the new outbox ids in the order of `outbox`.
        """
        if not writes and not outbox and not confirmed_outbox:
            return []
        result = await self._conn.execute(
            _WRITE_BATCH,
            _batch_params(writes, outbox, confirmed_outbox, self._retention),
        )
        # INSERT ... SELECT FROM unnest keeps the input order for a serial id.
        return sorted(row.id for row in result)

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        if ids:
            await self._conn.execute(_DELETE_OUTBOX, {"ids": list(ids)})


def _batch_params(
    writes: Sequence[StepWrite],
    outbox: Sequence[OutboxMessage],
    confirmed: Sequence[int],
    retention: int,
) -> dict[str, Any]:
    entries = [(w.key, e) for w in writes for e in w.entries]
    failures = [(w.key, f) for w in writes if (f := w.failed_attempt) is not None]
    waits = [_waiting_columns(w.waiting) for w in writes]
    return {
        "confirmed": list(confirmed),
        "retention": retention,
        "j_tenants": [k.tenant for k, _ in entries],
        "j_ids": [k.instance_id for k, _ in entries],
        "seqs": [e.seq for _, e in entries],
        "kinds": [int(e.kind) for _, e in entries],
        "names": [e.name for _, e in entries],
        "vals": [e.value for _, e in entries],
        "attempts": [e.attempt for _, e in entries],
        "starts": [e.started_at for _, e in entries],
        "ends": [e.finished_at for _, e in entries],
        "flags": [int(e.flags) for _, e in entries],
        "a_tenants": [k.tenant for k, _ in failures],
        "a_ids": [k.instance_id for k, _ in failures],
        "a_seqs": [f.seq for _, f in failures],
        "a_attempts": [f.attempt for _, f in failures],
        "a_names": [f.name for _, f in failures],
        "a_errors": [f.error for _, f in failures],
        "a_starts": [f.started_at for _, f in failures],
        "a_ends": [f.finished_at for _, f in failures],
        **split_keys(w.key for w in writes),
        "statuses": [w.status.value for w in writes],
        "positions": [w.position for w in writes],
        "u_attempts": [w.attempt for w in writes],
        "wait_kinds": [w["kind"] for w in waits],
        "wait_names": [w["name"] for w in waits],
        "wait_events": [w["event"] for w in waits],
        "wait_timeouts": [w["timeout"] for w in waits],
        "wake_ats": [w["wake_at"] for w in waits],
        "modes": [int(w.mode) for w in writes],
        "end_statuses": [w.end_status.value if w.end_status else None for w in writes],
        "outputs": [w.output for w in writes],
        "errors": [w.error for w in writes],
        "state_bytes": [w.state_bytes for w in writes],
        "keys": [m.routing_key for m in outbox],
        "headers": [m.headers for m in outbox],
        "bodies": [m.body for m in outbox],
    }


_DUE_TIMERS = text(
    """
    WITH due AS (
        SELECT tenant, id FROM instances
        WHERE wake_at <= now() AND status IN ('queued', 'running', 'sleeping', 'waiting')
          AND (wake_sent_at IS NULL OR wake_sent_at < now() - make_interval(secs => :resend))
        ORDER BY wake_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE instances AS i SET wake_sent_at = now()
    FROM due WHERE i.tenant = due.tenant AND i.id = due.id
    RETURNING i.tenant, i.id, i.module, i.position, i.attempt, i.generation, i.wake_at
    """
)

_DELETE_EXPIRED = text(
    """
    DELETE FROM instances WHERE (tenant, id) IN (
        SELECT tenant, id FROM instances WHERE retain_until < now()
        ORDER BY retain_until LIMIT :limit FOR UPDATE SKIP LOCKED)
    """
)

_WAITING_EVENTS = text(
    """
    SELECT count(*) FROM events
    WHERE tenant = :tenant AND instance_id = :id AND consumed_seq IS NULL
    """
)


class PgStore:
    """The PostgreSQL store; one per process, sharing a small connection pool.

    `retention_seconds` is how long finished instances are kept unless their create said
    otherwise.
    """

    def __init__(
        self, url: str, *, pool_size: int = 4, retention_seconds: int = 30 * 86400
    ) -> None:
        self._engine: AsyncEngine = create_async_engine(
            url, pool_size=pool_size, max_overflow=4, pool_pre_ping=True
        )
        self._retention = retention_seconds
        self.tenants = TenantStore(self._engine)
        self.dead_letters = DeadLetterStore(self._engine)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

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
                _DUE_TIMERS, {"limit": limit, "resend": resend_after_seconds}
            )
            return [
                DueTimer(
                    InstanceKey(row.tenant, row.id),
                    row.module,
                    row.position,
                    row.attempt,
                    row.generation,
                    row.wake_at,
                )
                for row in result
            ]

    async def delete_expired(self, *, limit: int) -> int:
        """Delete up to `limit` finished instances past their retention; return how many."""
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(_DELETE_EXPIRED, {"limit": limit})
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
            return [(record_from_row(row), row.params) for row in result]

    async def journal(self, key: InstanceKey) -> list[JournalEntry]:
        """Return an instance's whole journal in order."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(
                select(journal)
                .where(journal.c.tenant == key.tenant, journal.c.instance_id == key.instance_id)
                .order_by(journal.c.seq)
            )
            return [entry_from_row(row) for row in result]

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
            entries = await connection.execute(
                select(journal)
                .where(journal.c.tenant == key.tenant, journal.c.instance_id == key.instance_id)
                .order_by(journal.c.seq)
            )
            attempts = await connection.execute(
                select(step_attempts)
                .where(
                    step_attempts.c.tenant == key.tenant,
                    step_attempts.c.instance_id == key.instance_id,
                )
                .order_by(step_attempts.c.seq, step_attempts.c.attempt)
            )
            waiting = await connection.execute(
                _WAITING_EVENTS, {"tenant": key.tenant, "id": key.instance_id}
            )
            return InstanceDetail(
                record=record_from_row(row),
                params=row.params,
                journal=[entry_from_row(e) for e in entries],
                attempts=[
                    FailedAttempt(a.seq, a.name, a.attempt, a.error, a.started_at, a.finished_at)
                    for a in attempts
                ],
                pending_events=waiting.scalar_one(),
            )

    async def list_instances(
        self,
        tenant: str,
        *,
        statuses: Sequence[InstanceStatus] = (),
        module: str | None = None,
        limit: int = 100,
    ) -> list[InstanceRecord]:
        """List a tenant's instances, newest first, optionally by status and module."""
        query = select(instances).where(instances.c.tenant == tenant)
        if statuses:
            query = query.where(instances.c.status.in_([s.value for s in statuses]))
        if module is not None:
            query = query.where(instances.c.module == module)
        query = query.order_by(instances.c.created_at.desc(), instances.c.id).limit(limit)
        async with translated(), self._engine.connect() as connection:
            return [record_from_row(row) for row in await connection.execute(query)]

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        if ids:
            async with translated(), self._engine.begin() as connection:
                await connection.execute(_DELETE_OUTBOX, {"ids": list(ids)})

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
                (
                    row.id,
                    OutboxMessage(row.routing_key, row.headers, bytes(row.body), row.exchange),
                )
                for row in result
            ]
            yield claimed
            if claimed:
                await connection.execute(_DELETE_OUTBOX, {"ids": [i for i, _ in claimed]})
