"""The store port: what the step cycle needs of a store, as protocols.

Two stores implement it: `PgStore` (PostgreSQL, the fleet's) and `MemoryStore` (one process,
for `stepfleet run` and the unit tier). tests/integration/test_store_contract.py holds both to
the same guarantees: rows locked in key order, one journal entry per position, outbox rows
written with the state that asked for them and kept until deleted, events taken once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from stepfleet.schemas import InstanceKey, JournalEntry
from stepfleet.store.records import (
    CreatesWritten,
    DueTimer,
    EarlyEvent,
    EarlyHolding,
    GuardedCreate,
    GuardedWrite,
    HeldEvent,
    InstanceDetail,
    InstanceRecord,
    NewEvent,
    NewInstance,
    OutboxMessage,
    StepWrite,
)


class StepTx(Protocol):
    """One transaction of the step cycle, covering a whole batch of messages.

    Nothing it writes is visible to others before the transaction commits, and nothing is
    written at all when the block raises.
    """

    async def create_instances(self, new: Sequence[NewInstance]) -> set[InstanceKey]:
        """Insert instances that do not exist yet; return the keys actually inserted. Takes
        the locks `hold_early_events` takes first, so that the two serialise."""
        ...

    async def lock_instances(
        self, keys: Iterable[InstanceKey]
    ) -> dict[InstanceKey, InstanceRecord]:
        """Lock the rows in key order until commit and return those that exist."""
        ...

    async def owned_modules(self, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Return which (tenant, digest) pairs the tenant has pushed."""
        ...

    async def module_bytes(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Return the bytes of the stored modules among `digests`."""
        ...

    async def replay_data(
        self, since: dict[InstanceKey, int], *, with_params: Iterable[InstanceKey]
    ) -> tuple[dict[InstanceKey, str], dict[InstanceKey, list[JournalEntry]]]:
        """Return params for `with_params` and the journal of each key from its position on."""
        ...

    async def grant_slots(self, tenant: str, cap: int, need: int) -> int:
        """Take up to `need` of a tenant's `cap` running-step slots until commit."""
        ...

    async def take_tokens(self, tenant: str, per_second: float, need: int) -> float:
        """Take `need` tokens of the tenant's rate bucket; return the tokens there were."""
        ...

    async def known_events(self, events: Sequence[tuple[InstanceKey, str]]) -> set[InstanceKey]:
        """Of (instance, event id) pairs, the instances that already received that event."""
        ...

    async def insert_events(self, events: Sequence[NewEvent]) -> set[InstanceKey]:
        """Store events; return the keys whose event was new (the rest are repeats)."""
        ...

    async def take_events(
        self, waits: Sequence[tuple[InstanceKey, str, int]]
    ) -> dict[InstanceKey, tuple[str, datetime]]:
        """For each (instance, event type, position) wait, take the oldest stored event."""
        ...

    async def hold_early_events(
        self,
        early: Sequence[EarlyEvent],
        *,
        hold_seconds: float,
        tenant_bytes: int | None = None,
    ) -> EarlyHolding:
        """Hold events whose instance does not exist, each tenant's up to `tenant_bytes` held
        at once (`held_bytes`; None: no limit); report the instances that exist after all
        (created and committed meanwhile) and the events refused for their tenant's share,
        neither of which is held."""
        ...

    async def adopt_early_events(self, keys: Sequence[InstanceKey]) -> int:
        """Store the events held for instances this transaction has just created (after
        `create_instances`, which took the locks `hold_early_events` takes)."""
        ...

    async def write_batch(
        self,
        writes: Sequence[StepWrite],
        outbox: Sequence[OutboxMessage],
        *,
        confirmed_outbox: Sequence[int] = (),
    ) -> list[int]:
        """Write journal entries, failed attempts, instance states and outbox rows at once;
        delete `confirmed_outbox`. Returns the new outbox ids in the order of `outbox`."""
        ...


class StepStore(Protocol):
    """The store the step cycle, the timer loop and the outbox relay run against."""

    def transaction(self) -> AbstractAsyncContextManager[StepTx]:
        """Open one step transaction; it commits when the block ends without raising."""
        ...

    async def write_unchanged(
        self, writes: Sequence[GuardedWrite], *, confirmed_outbox: Sequence[int] = ()
    ) -> dict[InstanceKey, int | None]:
        """Apply each write whose row is still its `expected` row, with its next step's
        outbox row and the deletion of the outbox row it finishes, all at once; delete
        `confirmed_outbox` whatever happens to the writes.

        Returns, for each write applied, its next step's outbox id (None without one); a
        write left out (its row moved on) changed nothing.
        """
        ...

    async def write_created(
        self, creates: Sequence[GuardedCreate], *, confirmed_outbox: Sequence[int] = ()
    ) -> CreatesWritten:
        """Insert each create's row that does not exist yet with its first step's write, all
        at once: for the rows inserted, adopt the events held for them (as
        `adopt_early_events`), append the journal entries and failed attempts and queue the
        next steps' outbox rows; delete `confirmed_outbox` whatever happens to the creates.

        Takes the locks `hold_early_events` takes without waiting for them: when one is held
        (or was released while the write began), nothing is written (`busy`).
        """
        ...

    async def put_module(self, tenant: str, digest: str, wasm: bytes) -> bool:
        """Store a module for a tenant; return False when the tenant already had it."""
        ...

    async def module_bytes(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Return the bytes of the stored modules among `digests`."""
        ...

    async def due_timers(self, *, limit: int, resend_after_seconds: float) -> list[DueTimer]:
        """Claim parked instances whose timer is due and not sent in the last
        `resend_after_seconds`, earliest first."""
        ...

    async def detail(self, key: InstanceKey) -> InstanceDetail | None:
        """Return an instance with its params, journal, failed attempts and stored events."""
        ...

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        ...

    async def expire_early_events(self, *, limit: int) -> int:
        """Move the dead letters of early events whose hold ended to the outbox."""
        ...

    async def held_events(self, key: InstanceKey) -> list[HeldEvent]:
        """The early events held for an instance that does not exist (yet)."""
        ...

    def claim_outbox(
        self, *, older_than_seconds: float, limit: int
    ) -> AbstractAsyncContextManager[list[tuple[int, OutboxMessage]]]:
        """Lock outbox rows older than `older_than_seconds`; delete them if the block ends
        without raising."""
        ...
