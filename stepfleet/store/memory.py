"""MemoryStore: the store port in one process's memory, for `stepfleet run` and tests.

It keeps PgStore's guarantees (tests/integration/test_store_contract.py runs the same tests
against both):

- A transaction stages its writes and applies them all when its block ends without raising;
  a block that raises leaves nothing. Others read only committed rows (read committed).
- Row locks stand in for PostgreSQL's: a transaction holds the instance rows it locks,
  creates or updates, the journal positions, failed attempts and events it inserts, the
  events it takes, the outbox rows it deletes, its tenants' rate buckets and running-step
  slots, until it ends. A transaction that wants a row another holds waits (an
  asyncio.Condition over one owner table) until that one ends, so transactions on the same
  rows serialize. There is no deadlock detection: lock rows in key order, as PostgreSQL wants
  too. `due_timers` and `claim_outbox` skip locked rows, as SKIP LOCKED does.
- A write that breaks a rule the schema enforces (a second journal entry or failed attempt at
  one position, an instance of a module never stored, rows of an instance that does not
  exist) raises `IntegrityViolation` where PgStore raises SQLAlchemy's IntegrityError. The
  transaction is then aborted, as in PostgreSQL: later calls raise and nothing is committed.
- `clock` stands for PostgreSQL's now(): read once when a transaction starts (now() is the
  transaction's start time), and once per `due_timers`, `claim_outbox` and `put_module`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from stepfleet.schemas import InstanceKey, InstanceStatus, JournalEntry
from stepfleet.store.memory_tx import LockKey, MemoryTransaction, Tables
from stepfleet.store.records import (
    CreatesWritten,
    DueTimer,
    GuardedCreate,
    GuardedWrite,
    HeldEvent,
    InstanceDetail,
    InstanceRecord,
    OutboxMessage,
)

_TIMED = frozenset(
    {InstanceStatus.QUEUED, InstanceStatus.RUNNING, InstanceStatus.SLEEPING, InstanceStatus.WAITING}
)


def utc_now() -> datetime:
    """The wall clock, as an aware UTC datetime."""
    return datetime.now(UTC)


class Locks:
    """Row locks: each key has at most one owning transaction until that transaction ends."""

    def __init__(self) -> None:
        self._owners: dict[LockKey, object] = {}
        self._freed = asyncio.Condition()

    def holder(self, key: LockKey) -> object | None:
        """The transaction holding `key`, if any."""
        return self._owners.get(key)

    def try_take(self, owner: object, key: LockKey) -> bool:
        """Take `key` for `owner` unless another holds it (taking it again is fine)."""
        return self._owners.setdefault(key, owner) is owner

    async def take(self, owner: object, keys: Iterable[LockKey]) -> None:
        """Take every key in sorted order, waiting for the transactions that hold them."""
        for key in sorted(set(keys)):
            if not self.try_take(owner, key):
                async with self._freed:
                    while not self.try_take(owner, key):
                        await self._freed.wait()

    async def release(self, owner: object) -> None:
        """Release everything `owner` holds and wake the transactions waiting for it."""
        held = [key for key, holder in self._owners.items() if holder is owner]
        if held:
            for key in held:
                del self._owners[key]
            async with self._freed:
                self._freed.notify_all()


@dataclass
class _Modules:
    wasm: dict[str, bytes] = field(default_factory=dict)
    owners: dict[tuple[str, str], datetime] = field(default_factory=dict)


class MemoryStore:
    """The store port over plain dictionaries; one per process, on one event loop.

    `retention_seconds` is how long finished instances are kept unless their create said
    otherwise; `clock` is the store's now() (UTC wall clock unless a test injects one).
    """

    def __init__(
        self,
        *,
        retention_seconds: int = 30 * 86400,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.clock = clock
        self.retention_seconds = retention_seconds
        self.tables = Tables()
        self.locks = Locks()
        self._modules = _Modules()
        self._outbox_ids = itertools.count(1)

    def next_outbox_id(self) -> int:
        """The next outbox id; like a sequence, a rolled back transaction leaves a gap."""
        return next(self._outbox_ids)

    async def close(self) -> None:
        """Nothing to close; here so a runner can treat both stores alike."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTransaction]:
        """Run a batch in one transaction, committed when the block exits cleanly."""
        tx = MemoryTransaction(self, now=self.clock())
        try:
            yield tx
            tx.commit()
        finally:
            await self.locks.release(tx)

    async def write_unchanged(
        self, writes: Sequence[GuardedWrite], *, confirmed_outbox: Sequence[int] = ()
    ) -> dict[InstanceKey, int | None]:
        """Apply the writes whose rows are still as expected (see StepStore.write_unchanged):
        here, as PgStore's one statement does, in one transaction."""
        if not writes and not confirmed_outbox:
            return {}
        async with self.transaction() as tx:
            rows = await tx.lock_instances(g.write.key for g in writes)
            applied = [
                g for g in writes if (row := rows.get(g.write.key)) and g.expected.matches(row)
            ]
            queued = [g for g in applied if g.next_step is not None]
            ids = await tx.write_batch(
                [g.write for g in applied],
                [g.next_step for g in queued if g.next_step is not None],
                confirmed_outbox=[
                    *confirmed_outbox,
                    *(g.finishes for g in applied if g.finishes is not None),
                ],
            )
        by_key: dict[InstanceKey, int | None] = {g.write.key: None for g in applied}
        by_key.update(zip((g.write.key for g in queued), ids, strict=True))
        return by_key

    async def write_created(
        self, creates: Sequence[GuardedCreate], *, confirmed_outbox: Sequence[int] = ()
    ) -> CreatesWritten:
        """Insert the creates' rows that do not exist yet with their first writes (see
        StepStore.write_created): here, in one transaction, so never `busy`."""
        if not creates and not confirmed_outbox:
            return CreatesWritten()
        async with self.transaction() as tx:
            inserted = await tx.create_instances([c.new for c in creates])
            rows = await tx.lock_instances(c.new.key for c in creates)
            adopted = await tx.adopt_early_events(sorted(inserted))
            written = [c for c in creates if c.new.key in inserted]
            queued = [c for c in written if c.next_step is not None]
            ids = await tx.write_batch(
                [c.write for c in written],
                [c.next_step for c in queued if c.next_step is not None],
                confirmed_outbox=confirmed_outbox,
            )
        by_key: dict[InstanceKey, int | None] = {c.new.key: None for c in written}
        by_key.update(zip((c.new.key for c in queued), ids, strict=True))
        existing = {key: row.module for key, row in rows.items() if key not in inserted}
        return CreatesWritten(by_key, existing, adopted)

    # -- modules -------------------------------------------------------------------------

    async def put_module(self, tenant: str, digest: str, wasm: bytes) -> bool:
        """Store a module for a tenant; return False when the tenant already had it."""
        self._modules.wasm.setdefault(digest, wasm)
        if (tenant, digest) in self._modules.owners:
            return False
        self._modules.owners[tenant, digest] = self.clock()
        return True

    async def module_bytes(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Return the bytes of the stored modules among `digests`."""
        return {d: self._modules.wasm[d] for d in digests if d in self._modules.wasm}

    def has_module(self, digest: str) -> bool:
        """Tell whether a module is stored."""
        return digest in self._modules.wasm

    def owned_modules(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Return which (tenant, digest) pairs the tenant has pushed."""
        return {pair for pair in pairs if pair in self._modules.owners}

    # -- timers --------------------------------------------------------------------------

    async def due_timers(self, *, limit: int, resend_after_seconds: float) -> list[DueTimer]:
        """Claim parked instances whose timer is due and not sent in the last
        `resend_after_seconds` (rows a transaction holds are skipped), earliest first."""
        now = self.clock()
        resend_before = now - timedelta(seconds=resend_after_seconds)
        due = sorted(
            (row.record.waiting.wake_at, key)
            for key, row in self.tables.instances.items()
            if row.record.waiting is not None
            and row.record.waiting.wake_at <= now
            and row.record.status in _TIMED
            and (row.wake_sent_at is None or row.wake_sent_at < resend_before)
            and self.locks.holder(("instance", *key)) is None
        )[: max(limit, 0)]
        timers = []
        for wake_at, key in due:
            row = self.tables.instances[key] = replace(self.tables.instances[key], wake_sent_at=now)
            r = row.record
            timers.append(
                DueTimer(key, r.module, r.position, r.attempt, r.generation, wake_at, r.traceparent)
            )
        return timers

    # -- reads ---------------------------------------------------------------------------

    async def find_instances(
        self, instance_id: str, tenant: str | None = None
    ) -> list[tuple[InstanceRecord, str]]:
        """Return the instances with this id (in one tenant, or in any), with their params."""
        return [
            (row.record, row.params)
            for key, row in sorted(self.tables.instances.items())
            if key.instance_id == instance_id and tenant in (None, key.tenant)
        ]

    async def journal(self, key: InstanceKey) -> list[JournalEntry]:
        """Return an instance's whole journal in order."""
        entries = self.tables.journal.get(key, {})
        return [entries[seq] for seq in sorted(entries)]

    async def detail(self, key: InstanceKey) -> InstanceDetail | None:
        """Return an instance with its params, journal, failed attempts and stored events."""
        row = self.tables.instances.get(key)
        if row is None:
            return None
        attempts = self.tables.attempts.get(key, {})
        events = self.tables.events.get(key, {}).values()
        return InstanceDetail(
            record=row.record,
            params=row.params,
            journal=await self.journal(key),
            attempts=[attempts[n] for n in sorted(attempts)],
            pending_events=sum(1 for e in events if e.consumed_seq is None),
        )

    # -- outbox --------------------------------------------------------------------------

    def outbox(self) -> list[tuple[int, OutboxMessage]]:
        """The committed outbox rows not deleted yet, by id."""
        return [(i, self.tables.outbox[i][0]) for i in sorted(self.tables.outbox)]

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        if ids:
            async with self.transaction() as tx:
                await tx.delete_outbox(ids)

    # -- early events ----------------------------------------------------------------------

    async def expire_early_events(self, *, limit: int) -> int:
        """Move the dead letters of early events whose hold ended to the outbox, dated when
        each event arrived; return how many."""
        now = self.clock()
        expired = sorted(
            (h.expires_at, key, event_id)
            for key, rows in self.tables.early.items()
            for event_id, h in rows.items()
            if h.expires_at <= now and self.locks.holder(("key", *key)) is None
        )[:limit]
        for _, key, event_id in expired:
            held = self.tables.early[key].pop(event_id)
            if not self.tables.early[key]:
                del self.tables.early[key]
            self.tables.outbox[self.next_outbox_id()] = (held.early.letter, held.received_at)
        return len(expired)

    async def held_events(self, key: InstanceKey) -> list[HeldEvent]:
        """The early events held for an instance that does not exist (yet), oldest first."""
        rows = sorted(
            self.tables.early.get(key, {}).items(), key=lambda r: (r[1].received_at, r[0])
        )
        return [
            HeldEvent(event_id, h.early.event.type, h.received_at, h.expires_at)
            for event_id, h in rows
        ]

    @asynccontextmanager
    async def claim_outbox(
        self, *, older_than_seconds: float, limit: int
    ) -> AsyncIterator[list[tuple[int, OutboxMessage]]]:
        """Lock outbox rows older than `older_than_seconds` (skipping rows a transaction
        holds); delete them if the block ends without raising."""
        async with self.transaction() as tx:
            before = tx.now - timedelta(seconds=older_than_seconds)
            claimed: list[tuple[int, OutboxMessage]] = []
            for i in sorted(self.tables.outbox):
                if len(claimed) >= limit:
                    break
                message, created_at = self.tables.outbox[i]
                if created_at < before and self.locks.try_take(tx, ("outbox", i)):
                    claimed.append((i, message))
            yield claimed
            await tx.delete_outbox([i for i, _ in claimed])
