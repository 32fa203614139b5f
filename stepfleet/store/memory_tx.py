"""MemoryTransaction: one step transaction of MemoryStore (its semantics: store/memory.py).

Writes are staged in a `Tables` of their own and laid over the committed one on commit; reads
see the committed rows with the transaction's own writes on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from stepfleet.schemas import FailedAttempt, InstanceKey, InstanceStatus, JournalEntry
from stepfleet.store.errors import IntegrityViolation, StoreError
from stepfleet.store.records import (
    EarlyEvent,
    EarlyHolding,
    InstanceRecord,
    NewEvent,
    NewInstance,
    OutboxMessage,
    StepWrite,
    held_bytes,
    within_share,
)

if TYPE_CHECKING:
    from stepfleet.store.memory import MemoryStore

LockKey = tuple[str | int, ...]
"""What a row lock names: the table, then the row's key ("instance", tenant, id)."""

_K = TypeVar("_K")
_R = TypeVar("_R")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance row: the record (every column) plus what records do not show."""

    record: InstanceRecord
    params: str
    retention_seconds: int | None = None
    wake_sent_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """An event row; `consumed_seq` is the position that took it, None while stored."""

    type: str
    payload: str
    received_at: datetime
    consumed_seq: int | None = None


@dataclass
class Tables:
    """The rows of a MemoryStore, or the rows one transaction writes."""

    instances: dict[InstanceKey, Instance] = field(default_factory=dict)
    journal: dict[InstanceKey, dict[int, JournalEntry]] = field(default_factory=dict)
    attempts: dict[InstanceKey, dict[tuple[int, int], FailedAttempt]] = field(default_factory=dict)
    events: dict[InstanceKey, dict[str, Event]] = field(default_factory=dict)
    outbox: dict[int, tuple[OutboxMessage, datetime]] = field(default_factory=dict)
    """Each message with its created_at."""
    rates: dict[str, tuple[float, datetime]] = field(default_factory=dict)
    """Each tenant's token bucket: tokens and when they were counted."""
    early: dict[InstanceKey, dict[str, Held]] = field(default_factory=dict)
    """Early events held for instances that do not exist yet, by event id."""


@dataclass(frozen=True, slots=True)
class Held:
    """An early event row: the event, its dead letter, when it came and when its hold ends."""

    early: EarlyEvent
    received_at: datetime
    expires_at: datetime


def _merged(
    committed: dict[_K, dict[_R, _V]], staged: dict[_K, dict[_R, _V]], key: _K
) -> dict[_R, _V]:
    """The rows of one instance as a transaction sees them: committed, then its own."""
    return {**committed.get(key, {}), **staged.get(key, {})}


def _lay_over(committed: dict[_K, dict[_R, _V]], staged: dict[_K, dict[_R, _V]]) -> None:
    for key, rows in staged.items():
        committed.setdefault(key, {}).update(rows)


def _locked(record: InstanceRecord) -> InstanceRecord:
    """What lock_instances shows of a row: the state columns, as PgStore selects them."""
    return replace(
        record, output=None, created_at=None, updated_at=None, finished_at=None, retain_until=None
    )


class MemoryTransaction:
    """One transaction of MemoryStore, covering a whole batch of deliveries."""

    def __init__(self, store: MemoryStore, *, now: datetime) -> None:
        self.now = now
        """The transaction's now(), read from the store's clock when it began."""
        self._store = store
        self._db = store.tables
        self._new = Tables()
        self._deleted_outbox: set[int] = set()
        self._adopted: set[InstanceKey] = set()
        self._failure: StoreError | None = None

    # -- life ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._failure is not None:
            raise StoreError(f"the transaction is aborted: {self._failure}")

    def _abort(self, failure: StoreError) -> StoreError:
        self._failure = failure
        return failure

    async def _lock(self, keys: Iterable[LockKey]) -> None:
        await self._store.locks.take(self, keys)

    def commit(self) -> None:
        """Lay the staged rows over the committed ones (an aborted transaction writes none)."""
        if self._failure is not None:
            return
        self._db.instances.update(self._new.instances)
        _lay_over(self._db.journal, self._new.journal)
        _lay_over(self._db.attempts, self._new.attempts)
        _lay_over(self._db.events, self._new.events)
        self._db.rates.update(self._new.rates)
        self._db.outbox.update(self._new.outbox)
        for i in self._deleted_outbox:
            self._db.outbox.pop(i, None)
        for key in self._adopted:
            self._db.early.pop(key, None)
        _lay_over(self._db.early, self._new.early)

    # -- what this transaction sees ----------------------------------------------------------

    def _instance(self, key: InstanceKey) -> Instance | None:
        return self._new.instances.get(key) or self._db.instances.get(key)

    def _journal(self, key: InstanceKey) -> dict[int, JournalEntry]:
        return _merged(self._db.journal, self._new.journal, key)

    def _events(self, key: InstanceKey) -> dict[str, Event]:
        return _merged(self._db.events, self._new.events, key)

    def _exists(self, key: InstanceKey, what: str) -> None:
        if self._instance(key) is None:
            raise self._abort(IntegrityViolation(f"{what} of {key} which does not exist"))

    # -- the port ----------------------------------------------------------------------------

    async def create_instances(self, new: Sequence[NewInstance]) -> set[InstanceKey]:
        """Insert instances that do not exist yet; return the keys actually inserted. Takes
        the keys' locks shared with `hold_early_events` first, as PgStore does."""
        self._check()
        await self._lock(("key", *n.key) for n in new)
        await self._lock(("instance", *n.key) for n in new)
        created: set[InstanceKey] = set()
        for n in new:
            if self._instance(n.key) is not None:
                continue
            if not self._store.has_module(n.module):
                raise self._abort(IntegrityViolation(f"module {n.module} is not stored"))
            record = InstanceRecord(
                n.key,
                n.module,
                InstanceStatus.RUNNING,
                position=0,
                generation=0,
                state_bytes=len(n.params.encode()),
                created_at=self.now,
                updated_at=self.now,
            )
            self._new.instances[n.key] = Instance(record, n.params, n.retention_seconds)
            created.add(n.key)
        return created

    async def lock_instances(
        self, keys: Iterable[InstanceKey]
    ) -> dict[InstanceKey, InstanceRecord]:
        """Lock the rows (in key order, so batches never deadlock) and return them."""
        self._check()
        wanted = sorted(set(keys))
        await self._lock(("instance", *k) for k in wanted if self._instance(k) is not None)
        return {k: _locked(row.record) for k in wanted if (row := self._instance(k)) is not None}

    async def owned_modules(self, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Return which (tenant, digest) pairs the tenant has pushed."""
        self._check()
        return self._store.owned_modules(pairs)

    async def module_bytes(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Return the bytes of the stored modules among `digests`."""
        self._check()
        return await self._store.module_bytes(digests)

    async def replay_data(
        self, since: dict[InstanceKey, int], *, with_params: Iterable[InstanceKey]
    ) -> tuple[dict[InstanceKey, str], dict[InstanceKey, list[JournalEntry]]]:
        """Return params for `with_params` and the journal of each key from its position on."""
        self._check()
        params = {k: row.params for k in with_params if (row := self._instance(k)) is not None}
        entries: dict[InstanceKey, list[JournalEntry]] = {}
        for key, start in since.items():
            journal = self._journal(key)
            entries[key] = [journal[seq] for seq in sorted(journal) if seq >= start]
        return params, entries

    async def grant_slots(self, tenant: str, cap: int, need: int) -> int:
        """Take up to `need` of a tenant's `cap` running-step slots until commit.

        A slot is a lock ("slot", tenant, number) held by whichever transaction took it; as
        with PostgreSQL's advisory locks, slots this transaction holds count again."""
        self._check()
        granted = 0
        for slot in range(cap):
            if granted >= need:
                break
            if self._store.locks.try_take(self, ("slot", tenant, slot)):
                granted += 1
        return granted

    async def take_tokens(self, tenant: str, per_second: float, need: int) -> float:
        """Take `need` tokens of the tenant's bucket; return the tokens there were.

        The bucket holds up to a second's worth (at least one token) and goes negative by the
        tokens taken from the future, as PgStore's does."""
        self._check()
        await self._lock([("rate", tenant)])
        full = max(per_second, 1.0)
        bucket = self._new.rates.get(tenant) or self._db.rates.get(tenant)
        if bucket is None:
            before = full
        else:
            tokens, counted = bucket
            before = min(full, tokens + per_second * (self.now - counted).total_seconds())
        self._new.rates[tenant] = (before - need, self.now)
        return before

    async def known_events(self, events: Sequence[tuple[InstanceKey, str]]) -> set[InstanceKey]:
        """Of (instance, event id) pairs, the instances that already received that event."""
        self._check()
        return {key for key, event_id in events if event_id in self._events(key)}

    async def insert_events(self, events: Sequence[NewEvent]) -> set[InstanceKey]:
        """Store events; return the keys whose event was new (the rest are repeats)."""
        self._check()
        await self._lock(("event", *e.key, e.event_id) for e in events)
        new: set[InstanceKey] = set()
        for e in events:
            if e.event_id in self._events(e.key):
                continue
            self._exists(e.key, "an event")
            row = Event(e.type, e.payload, self.now, e.consumed_seq)
            self._new.events.setdefault(e.key, {})[e.event_id] = row
            new.add(e.key)
        return new

    async def take_events(
        self, waits: Sequence[tuple[InstanceKey, str, int]]
    ) -> dict[InstanceKey, tuple[str, datetime]]:
        """For each (instance, event type, position) wait, take the oldest stored event
        (by arrival, then event id); at most one per instance, as in PgStore."""
        self._check()
        taken: dict[InstanceKey, tuple[str, datetime]] = {}
        for key in sorted({w[0] for w in waits}):
            seqs = {kind: seq for k, kind, seq in reversed(waits) if k == key}
            while True:
                stored = [
                    (event.received_at, event_id, event)
                    for event_id, event in self._events(key).items()
                    if event.consumed_seq is None and event.type in seqs
                ]
                if not stored:
                    break
                at, event_id, event = min(stored, key=lambda s: (s[0], s[1]))
                await self._lock([("event", *key, event_id)])
                if self._events(key).get(event_id) != event:
                    continue  # another transaction took it while this one waited
                consumed = replace(event, consumed_seq=seqs[event.type])
                self._new.events.setdefault(key, {})[event_id] = consumed
                taken[key] = (event.payload, at)
                break
        return taken

    async def hold_early_events(
        self,
        early: Sequence[EarlyEvent],
        *,
        hold_seconds: float,
        tenant_bytes: int | None = None,
    ) -> EarlyHolding:
        """Hold events whose instance does not exist, each tenant's up to `tenant_bytes`;
        report the keys whose instance exists after all and the events refused for their
        tenant's share. A lock per instance key ("key", tenant, id) stands for PgStore's
        advisory lock, shared with `adopt_early_events`."""
        self._check()
        await self._lock(("key", *e.event.key) for e in early)
        existing = {e.event.key for e in early if self._instance(e.event.key) is not None}
        candidates = [e for e in early if e.event.key not in existing]
        rows = [
            (key, event_id, h)
            for key in {*self._db.early, *self._new.early} - self._adopted
            for event_id, h in _merged(self._db.early, self._new.early, key).items()
        ]
        used: dict[str, int] = {}
        for key, _, h in rows:
            used[key.tenant] = used.get(key.tenant, 0) + held_bytes(h.early)
        already = {(key, event_id) for key, event_id, _ in rows}
        fits, refused = within_share(candidates, used, already, tenant_bytes)
        ends = self.now + timedelta(seconds=hold_seconds)
        for e in fits:
            key = e.event.key
            if e.event.event_id in self._db.early.get(key, {}):
                continue
            self._new.early.setdefault(key, {}).setdefault(
                e.event.event_id, Held(e, self.now, ends)
            )
        return EarlyHolding(existing, refused)

    async def adopt_early_events(self, keys: Sequence[InstanceKey]) -> int:
        """Store the events held for instances this transaction has just created."""
        self._check()
        await self._lock(("key", *k) for k in keys)
        adopted = 0
        for key in keys:
            held = {**self._db.early.get(key, {}), **self._new.early.pop(key, {})}
            self._adopted.add(key)
            events = self._new.events.setdefault(key, {})
            for event_id, h in held.items():
                if event_id in self._events(key):
                    continue
                events[event_id] = Event(h.early.event.type, h.early.event.payload, h.received_at)
                adopted += 1
        return adopted

    async def write_batch(
        self,
        writes: Sequence[StepWrite],
        outbox: Sequence[OutboxMessage],
        *,
        confirmed_outbox: Sequence[int] = (),
    ) -> list[int]:
        """Write a batch's journal entries, attempts, instance states and outbox rows at once.

        Also deletes `confirmed_outbox`. Returns the new outbox ids in the order of `outbox`.
        Nothing is staged when any part breaks a rule.
        """
        self._check()
        if not writes and not outbox and not confirmed_outbox:
            return []
        entries = [(w.key, e) for w in writes for e in w.entries]
        failures = [(w.key, f) for w in writes if (f := w.failed_attempt) is not None]
        await self._lock(("outbox", i) for i in confirmed_outbox if i in self._db.outbox)
        await self._lock(("journal", *k, e.seq) for k, e in entries)
        await self._lock(("attempt", *k, f.seq, f.attempt) for k, f in failures)
        await self._lock(("instance", *w.key) for w in writes if self._instance(w.key) is not None)
        self._check_unique(entries, failures)
        await self.delete_outbox(confirmed_outbox)
        for key, entry in entries:
            self._new.journal.setdefault(key, {})[entry.seq] = entry
        for key, failure in failures:
            self._new.attempts.setdefault(key, {})[failure.seq, failure.attempt] = failure
        for w in writes:
            if (row := self._instance(w.key)) is not None:
                self._new.instances[w.key] = self._written(row, w)
        ids = [self._store.next_outbox_id() for _ in outbox]
        for i, message in zip(ids, outbox, strict=True):
            # PgStore's batch statement does not write the exchange column either.
            self._new.outbox[i] = (replace(message, exchange=None), self.now)
        return ids

    def _check_unique(
        self,
        entries: list[tuple[InstanceKey, JournalEntry]],
        failures: list[tuple[InstanceKey, FailedAttempt]],
    ) -> None:
        positions: set[tuple[InstanceKey, int]] = set()
        for key, entry in entries:
            self._exists(key, "a journal entry")
            if (key, entry.seq) in positions or entry.seq in self._journal(key):
                raise self._abort(
                    IntegrityViolation(f"{key} already has a journal entry at {entry.seq}")
                )
            positions.add((key, entry.seq))
        attempts: set[tuple[InstanceKey, int, int]] = set()
        for key, f in failures:
            self._exists(key, "a failed attempt")
            had = _merged(self._db.attempts, self._new.attempts, key)
            if (key, f.seq, f.attempt) in attempts or (f.seq, f.attempt) in had:
                raise self._abort(
                    IntegrityViolation(f"{key} already has attempt {f.attempt} at {f.seq}")
                )
            attempts.add((key, f.seq, f.attempt))

    def _written(self, row: Instance, w: StepWrite) -> Instance:
        final = w.status.is_final
        keep = row.retention_seconds
        if keep is None:
            keep = self._store.retention_seconds
        record = replace(
            row.record,
            status=w.status,
            position=w.position,
            attempt=w.attempt,
            waiting=w.waiting,
            mode=w.mode,
            end_status=w.end_status,
            output=w.output,
            error=w.error,
            state_bytes=w.state_bytes,
            updated_at=self.now,
            finished_at=self.now if final else None,
            retain_until=self.now + timedelta(seconds=keep) if final else None,
            traceparent=w.traceparent or row.record.traceparent,
        )
        return replace(row, record=record, wake_sent_at=None)

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        self._check()
        await self._lock(("outbox", i) for i in ids if i in self._db.outbox)
        self._deleted_outbox.update(ids)
        for i in ids:
            self._new.outbox.pop(i, None)
