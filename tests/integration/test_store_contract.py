"""The store port's contract: the same tests against MemoryStore and PgStore.

The pg case uses this run's migrated database (conftest.py); the memory case needs no
service. Tests touching tables every tenant shares (due timers, the outbox) look only at the
rows they wrote. A few memory-only tests at the end move the injected clock, where PgStore
would need the wall clock to pass.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from stepfleet.schemas import (
    EntryKind,
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    TenantLimits,
    Waiting,
    WaitKind,
    digest_of,
)
from stepfleet.store import (
    EarlyEvent,
    EarlyHolding,
    ExpectedRow,
    GuardedCreate,
    GuardedWrite,
    MemoryStore,
    NewEvent,
    NewInstance,
    OutboxMessage,
    PgStore,
    StepStore,
    StepTx,
    StepWrite,
    StoreUnavailable,
)
from stepfleet.store.errors import IntegrityViolation, StoreError
from stepfleet.store.records import held_bytes

RETENTION = 30 * 86400


class Clock:
    """A clock that moves 1 ms at every reading (time passes, but only as the store reads
    it), and as far as a test moves it."""

    def __init__(self) -> None:
        self.at = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.at += timedelta(milliseconds=1)
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@dataclass
class Contract:
    """One store under test, with a tenant and a pushed module of this test's own."""

    store: StepStore
    tenant: str
    module: str
    refused: type[Exception]
    """What a second journal entry at one position raises."""
    now: Callable[[], datetime]
    """The store's idea of now."""

    def key(self, name: str) -> InstanceKey:
        return InstanceKey(self.tenant, name)

    async def create(self, *names: str, retention: int | None = None) -> list[InstanceKey]:
        keys = [self.key(n) for n in names]
        async with self.store.transaction() as tx:
            new = [NewInstance(k, self.module, '{"n": 1}', retention) for k in keys]
            assert await tx.create_instances(new) == set(keys)
        return keys

    async def write(
        self, *writes: StepWrite, outbox: list[OutboxMessage] | None = None
    ) -> list[int]:
        async with self.store.transaction() as tx:
            return await tx.write_batch(writes, outbox or [])


@pytest.fixture(params=["memory", pytest.param("pg", marks=pytest.mark.services)])
def store_under_test(request: pytest.FixtureRequest) -> tuple[StepStore, type[Exception]]:
    """Each store, with what it raises for a duplicate journal position."""
    if request.param == "memory":
        return MemoryStore(clock=Clock()), IntegrityViolation
    pg: PgStore = request.getfixturevalue("store")
    return pg, IntegrityError


@pytest.fixture
async def contract(store_under_test: tuple[StepStore, type[Exception]]) -> Contract:
    store, refused = store_under_test
    tenant = f"c{uuid.uuid4().hex[:10]}"
    if isinstance(store, PgStore):
        await store.tenants.add(tenant, None, TenantLimits())
        now: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731
    else:
        assert isinstance(store, MemoryStore)
        now = store.clock
    wasm = b"\0asm\1\0\0\0" + tenant.encode()
    module = digest_of(wasm)
    assert await store.put_module(tenant, module, wasm)
    return Contract(store, tenant, module, refused, now)


def entry(seq: int, name: str = "step", kind: EntryKind = EntryKind.STEP_SUCCEEDED) -> JournalEntry:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seq)
    return JournalEntry(seq, kind, name, f'"value {seq}"', 1, at, at + timedelta(milliseconds=5))


def message(label: str, n: int = 0) -> OutboxMessage:
    return OutboxMessage(f"{label}.step", '{"x-kind": "step"}', f"{label} {n}".encode())


def parked(
    key: InstanceKey, wake_at: datetime, status: InstanceStatus = InstanceStatus.SLEEPING
) -> StepWrite:
    return StepWrite(key, status, 1, waiting=Waiting(WaitKind.SLEEP, "nap", wake_at))


class Undone(Exception):
    """Raised at the end of a block to undo it."""


@asynccontextmanager
async def rolled_back(store: StepStore) -> AsyncIterator[StepTx]:
    """A transaction whose block raises when it ends (the raise stops here)."""
    try:
        async with store.transaction() as tx:
            yield tx
            raise Undone
    except Undone:
        pass


async def pending_outbox(store: StepStore, label: str) -> dict[int, OutboxMessage]:
    """The outbox rows of this test (by routing key) still waiting, read through a claim that
    raises so nothing is deleted."""
    seen: dict[int, OutboxMessage] = {}
    try:
        async with store.claim_outbox(older_than_seconds=0, limit=100_000) as claimed:
            seen = {i: m for i, m in claimed if m.routing_key.startswith(f"{label}.")}
            raise Undone
    except Undone:
        pass
    return seen


# -- instances -----------------------------------------------------------------------------


async def test_create_instances_is_idempotent(contract: Contract) -> None:
    a, b, c = contract.key("a"), contract.key("b"), contract.key("c")
    async with contract.store.transaction() as tx:
        new = [NewInstance(k, contract.module, '{"é": 1}') for k in (a, b, b)]
        assert await tx.create_instances(new) == {a, b}
    async with contract.store.transaction() as tx:
        again = [NewInstance(k, contract.module, '{"other": 2}') for k in (a, c)]
        assert await tx.create_instances(again) == {c}
        assert await tx.create_instances([]) == set()
    detail = await contract.store.detail(a)
    assert detail is not None
    assert detail.params == '{"é": 1}'
    record = detail.record
    assert (record.status, record.position, record.generation, record.attempt) == (
        InstanceStatus.RUNNING,
        0,
        0,
        1,
    )
    assert record.state_bytes == len('{"é": 1}'.encode())
    assert record.created_at is not None
    assert record.finished_at is None


async def test_lock_instances_returns_existing_rows(contract: Contract) -> None:
    a, b = await contract.create("a", "b")
    async with contract.store.transaction() as tx:
        locked = await tx.lock_instances([b, contract.key("missing"), a])
    assert set(locked) == {a, b}
    assert locked[a].key == a
    assert locked[a].module == contract.module
    assert locked[a].status is InstanceStatus.RUNNING
    assert locked[a].waiting is None


async def test_writes_are_invisible_until_commit(contract: Contract) -> None:
    key = contract.key("late")
    async with contract.store.transaction() as tx:
        await tx.create_instances([NewInstance(key, contract.module, "{}")])
        assert await contract.store.detail(key) is None
    assert await contract.store.detail(key) is not None


async def test_transactions_on_the_same_rows_serialize(contract: Contract) -> None:
    (key,) = await contract.create("shared")
    second_waits = asyncio.Event()

    async def second() -> int:
        async with contract.store.transaction() as tx:
            second_waits.set()
            return (await tx.lock_instances([key]))[key].position

    async with contract.store.transaction() as tx:
        await tx.lock_instances([key])
        task = asyncio.create_task(second())
        await second_waits.wait()
        await tx.write_batch([StepWrite(key, InstanceStatus.RUNNING, 7)], [])
    assert await task == 7


# -- the journal and states ----------------------------------------------------------------


async def test_write_batch_is_read_back(contract: Contract) -> None:
    (key,) = await contract.create("w")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    failed = FailedAttempt(1, "charge", 1, "declined", at, at + timedelta(seconds=1))
    wake_at = contract.now() + timedelta(hours=1)
    waiting = Waiting(WaitKind.RETRY, "charge", wake_at)
    write = StepWrite(
        key,
        InstanceStatus.SLEEPING,
        1,
        (entry(0), entry(1)),
        attempt=2,
        waiting=waiting,
        state_bytes=99,
        failed_attempt=failed,
    )
    await contract.write(write)
    async with contract.store.transaction() as tx:
        params, entries = await tx.replay_data({key: 1}, with_params=[key])
        assert params == {key: '{"n": 1}'}
        assert entries == {key: [entry(1)]}
        params, entries = await tx.replay_data({key: 0, contract.key("none"): 0}, with_params=[])
        assert params == {}
        assert entries == {key: [entry(0), entry(1)], contract.key("none"): []}
        locked = await tx.lock_instances([key])
    assert locked[key].waiting == waiting
    detail = await contract.store.detail(key)
    assert detail is not None
    assert detail.journal == [entry(0), entry(1)]
    assert detail.attempts == [failed]
    record = detail.record
    assert (record.status, record.position, record.attempt, record.state_bytes) == (
        InstanceStatus.SLEEPING,
        1,
        2,
        99,
    )
    assert record.waiting == waiting
    assert record.retain_until is None


@pytest.mark.parametrize(("retention", "kept"), [(None, RETENTION), (60, 60)])
async def test_a_final_write_sets_retention(
    contract: Contract, retention: int | None, kept: int
) -> None:
    (key,) = await contract.create("done", retention=retention)
    await contract.write(StepWrite(key, InstanceStatus.COMPLETE, 1, (entry(0),), output='"fine"'))
    detail = await contract.store.detail(key)
    assert detail is not None
    record = detail.record
    assert record.status is InstanceStatus.COMPLETE
    assert record.output == '"fine"'
    assert record.finished_at is not None
    assert record.retain_until is not None
    assert record.retain_until - record.finished_at == timedelta(seconds=kept)


async def test_a_block_that_raises_leaves_nothing(contract: Contract) -> None:
    (key,) = await contract.create("kept")
    new = contract.key("never")
    label = f"rb{uuid.uuid4().hex[:8]}"
    async with rolled_back(contract.store) as tx:
        await tx.create_instances([NewInstance(new, contract.module, "{}")])
        await tx.lock_instances([key])
        await tx.write_batch(
            [StepWrite(key, InstanceStatus.COMPLETE, 1, (entry(0),))], [message(label)]
        )
        await tx.insert_events([NewEvent(key, "e1", "paid", "{}")])
    assert await contract.store.detail(new) is None
    detail = await contract.store.detail(key)
    assert detail is not None
    assert detail.record.status is InstanceStatus.RUNNING
    assert detail.journal == []
    assert detail.pending_events == 0
    assert await pending_outbox(contract.store, label) == {}
    async with contract.store.transaction() as tx:
        assert await tx.known_events([(key, "e1")]) == set()


async def test_a_journal_position_is_written_once(contract: Contract) -> None:
    (key,) = await contract.create("once")
    label = f"dup{uuid.uuid4().hex[:8]}"
    await contract.write(StepWrite(key, InstanceStatus.RUNNING, 1, (entry(0),)))
    with pytest.raises(contract.refused):
        async with contract.store.transaction() as tx:
            await tx.write_batch(
                [StepWrite(key, InstanceStatus.COMPLETE, 1, (entry(0, "again"),))],
                [message(label)],
            )
    with pytest.raises(contract.refused):
        await contract.write(StepWrite(key, InstanceStatus.RUNNING, 2, (entry(1), entry(1))))
    detail = await contract.store.detail(key)
    assert detail is not None
    assert detail.journal == [entry(0)]
    assert detail.record.status is InstanceStatus.RUNNING
    assert await pending_outbox(contract.store, label) == {}


def expected(
    key: InstanceKey, module: str, position: int, *, state_bytes: int, generation: int = 0
) -> ExpectedRow:
    """The row of a running instance as a worker's write left it."""
    return ExpectedRow(
        key, module, InstanceStatus.RUNNING, position, generation, state_bytes=state_bytes
    )


async def test_write_unchanged_writes_rows_still_as_expected(contract: Contract) -> None:
    a, b = await contract.create("ua", "ub")
    label = f"un{uuid.uuid4().hex[:8]}"
    (held_a, held_b) = await contract.write(outbox=[message(label, 0), message(label, 1)])
    (confirmed,) = await contract.write(outbox=[message(label, 2)])
    failed = FailedAttempt(0, "step", 1, "boom", entry(0).started_at, entry(0).finished_at)
    applied = await contract.store.write_unchanged(
        [
            GuardedWrite(
                StepWrite(b, InstanceStatus.COMPLETE, 1, (entry(0),), output='"done"'),
                expected(b, contract.module, 0, state_bytes=len('{"n": 1}')),
                finishes=held_b,
            ),
            GuardedWrite(
                StepWrite(a, InstanceStatus.RUNNING, 1, (entry(0),), failed_attempt=failed),
                expected(a, contract.module, 0, state_bytes=len('{"n": 1}')),
                next_step=message(label, 3),
                finishes=held_a,
            ),
        ],
        confirmed_outbox=[confirmed],
    )
    assert set(applied) == {a, b}
    assert applied[b] is None
    pending = await pending_outbox(contract.store, label)
    assert pending == {applied[a]: message(label, 3)}
    detail = await contract.store.detail(a)
    assert detail is not None
    assert (detail.record.status, detail.record.position) == (InstanceStatus.RUNNING, 1)
    assert detail.journal == [entry(0)]
    assert detail.attempts == [failed]
    done = await contract.store.detail(b)
    assert done is not None
    assert (done.record.status, done.record.output) == (InstanceStatus.COMPLETE, '"done"')
    assert done.record.retain_until is not None


@pytest.mark.parametrize("moved", ["position", "paused", "generation", "parked"])
async def test_write_unchanged_leaves_a_row_that_moved_on(contract: Contract, moved: str) -> None:
    key, other = await contract.create("moved", "still")
    label = f"mv{uuid.uuid4().hex[:8]}"
    (held, other_held) = await contract.write(outbox=[message(label, 0), message(label, 1)])
    size = len('{"n": 1}')
    guess = expected(key, contract.module, 0, state_bytes=size)
    if moved == "position":
        await contract.write(
            StepWrite(key, InstanceStatus.RUNNING, 1, (entry(0),), state_bytes=size)
        )
    elif moved == "paused":
        await contract.write(StepWrite(key, InstanceStatus.PAUSED, 0, state_bytes=size))
    elif moved == "generation":
        guess = expected(key, contract.module, 0, state_bytes=size, generation=1)
    else:
        wake_at = contract.now() + timedelta(hours=1)
        await contract.write(parked(key, wake_at, InstanceStatus.RUNNING))
        guess = expected(key, contract.module, 1, state_bytes=0)
    before = await contract.store.detail(key)
    applied = await contract.store.write_unchanged(
        [
            GuardedWrite(
                StepWrite(key, InstanceStatus.RUNNING, 2, (entry(0, "x"), entry(1, "x"))),
                guess,
                next_step=message(label, 2),
                finishes=held,
            ),
            GuardedWrite(
                StepWrite(other, InstanceStatus.RUNNING, 1, (entry(0),), state_bytes=size),
                expected(other, contract.module, 0, state_bytes=size),
                next_step=message(label, 3),
                finishes=other_held,
            ),
        ]
    )
    assert set(applied) == {other}
    assert await contract.store.detail(key) == before
    assert set((await pending_outbox(contract.store, label)).values()) == {
        message(label, 0),
        message(label, 3),
    }


def first_write(
    key: InstanceKey, module: str, write: StepWrite, next_step: OutboxMessage | None = None
) -> GuardedCreate:
    """A create's row (params '{"n": 1}') with its first step's write."""
    return GuardedCreate(NewInstance(key, module, '{"n": 1}'), write, next_step)


async def test_write_created_inserts_rows_with_their_first_write(contract: Contract) -> None:
    a, b = contract.key("ca"), contract.key("cb")
    label = f"cr{uuid.uuid4().hex[:8]}"
    (confirmed,) = await contract.write(outbox=[message(label, 0)])
    failed = FailedAttempt(0, "step", 1, "boom", entry(0).started_at, entry(0).finished_at)
    written = await contract.store.write_created(
        [
            first_write(
                b,
                contract.module,
                StepWrite(b, InstanceStatus.COMPLETE, 1, (entry(0),), output="2"),
            ),
            first_write(
                a,
                contract.module,
                StepWrite(a, InstanceStatus.RUNNING, 1, (entry(0),), failed_attempt=failed),
                next_step=message(label, 1),
            ),
        ],
        confirmed_outbox=[confirmed],
    )
    assert (written.busy, written.existing, written.adopted) == (False, {}, 0)
    assert set(written.inserted) == {a, b}
    assert written.inserted[b] is None
    assert await pending_outbox(contract.store, label) == {written.inserted[a]: message(label, 1)}
    detail = await contract.store.detail(a)
    assert detail is not None
    assert (detail.record.status, detail.record.position, detail.params) == (
        InstanceStatus.RUNNING,
        1,
        '{"n": 1}',
    )
    assert (detail.journal, detail.attempts) == ([entry(0)], [failed])
    done = await contract.store.detail(b)
    assert done is not None
    assert (done.record.status, done.record.output) == (InstanceStatus.COMPLETE, "2")
    assert done.record.retain_until is not None


async def test_write_created_leaves_a_row_that_exists(contract: Contract) -> None:
    (key,) = await contract.create("there")
    label = f"ce{uuid.uuid4().hex[:8]}"
    before = await contract.store.detail(key)
    written = await contract.store.write_created(
        [
            first_write(
                key,
                contract.module,
                StepWrite(key, InstanceStatus.RUNNING, 1, (entry(0, "again"),)),
                next_step=message(label, 0),
            )
        ]
    )
    assert (written.inserted, written.existing) == ({}, {key: contract.module})
    assert await contract.store.detail(key) == before
    assert await pending_outbox(contract.store, label) == {}


async def test_write_created_adopts_the_events_held_for_its_rows(contract: Contract) -> None:
    key = contract.key("adopting")
    async with contract.store.transaction() as tx:
        await tx.hold_early_events([_early(key, "e2"), _early(key, "e1")], hold_seconds=60)
    written = await contract.store.write_created(
        [first_write(key, contract.module, StepWrite(key, InstanceStatus.RUNNING, 1, (entry(0),)))]
    )
    assert (set(written.inserted), written.adopted) == ({key}, 2)
    assert await contract.store.held_events(key) == []
    async with contract.store.transaction() as tx:
        taken = await tx.take_events([(key, "go", 1)])
    assert taken[key][0] == '"early"'


async def test_write_created_writes_nothing_while_a_hold_of_its_key_is_under_way(
    contract: Contract,
) -> None:
    """The statement cannot see a hold that commits after it began, so it does not wait for
    one: it writes none of its creates, and the step transaction takes them."""
    if not isinstance(contract.store, PgStore):
        pytest.skip("MemoryStore's write is a transaction: it waits for the hold")
    key, other = contract.key("held"), contract.key("free")
    label = f"cb{uuid.uuid4().hex[:8]}"
    (confirmed,) = await contract.write(outbox=[message(label, 0)])
    async with contract.store.transaction() as tx:
        await tx.hold_early_events([_early(key, "e1")], hold_seconds=60)
        written = await contract.store.write_created(
            [
                first_write(
                    k, contract.module, StepWrite(k, InstanceStatus.RUNNING, 1, (entry(0),))
                )
                for k in (key, other)
            ],
            confirmed_outbox=[confirmed],
        )
    assert written.busy
    assert await contract.store.detail(key) is None
    assert await contract.store.detail(other) is None
    assert await pending_outbox(contract.store, label) == {}  # deleted all the same
    assert [h.event_id for h in await contract.store.held_events(key)] == ["e1"]


# -- the outbox ----------------------------------------------------------------------------


async def test_outbox_ids_rise_and_rows_stay_until_deleted(contract: Contract) -> None:
    label = f"ob{uuid.uuid4().hex[:8]}"
    first = await contract.write(outbox=[message(label, n) for n in range(3)])
    second = await contract.write(outbox=[message(label, 3)])
    assert first == sorted(first)
    assert len(set(first)) == 3
    assert second[0] > first[-1]
    pending = await pending_outbox(contract.store, label)
    assert pending == {i: message(label, n) for n, i in enumerate(first + second)}
    await contract.store.delete_outbox([first[0]])
    await contract.store.delete_outbox([])
    async with contract.store.transaction() as tx:
        assert await tx.write_batch([], [], confirmed_outbox=[first[1]]) == []
    assert set(await pending_outbox(contract.store, label)) == {first[2], second[0]}


async def test_claim_outbox_by_age_deleting_on_success(contract: Contract) -> None:
    label = f"cl{uuid.uuid4().hex[:8]}"
    ids = await contract.write(outbox=[message(label, 0), message(label, 1)])
    async with contract.store.claim_outbox(older_than_seconds=3600, limit=100_000) as claimed:
        assert not {i for i, _ in claimed} & set(ids)
    assert set(await pending_outbox(contract.store, label)) == set(ids)
    async with contract.store.claim_outbox(older_than_seconds=0, limit=100_000) as claimed:
        mine = [(i, m) for i, m in claimed if i in ids]
        assert mine == [(ids[0], message(label, 0)), (ids[1], message(label, 1))]
    assert await pending_outbox(contract.store, label) == {}


# -- timers --------------------------------------------------------------------------------


async def test_due_timers_claims_due_parked_instances_and_resends(contract: Contract) -> None:
    sleeping, waiting, future, paused, done = await contract.create(
        "sleeping", "waiting", "future", "paused", "done"
    )
    now = contract.now()
    await contract.write(
        parked(sleeping, now - timedelta(minutes=2)),
        parked(waiting, now - timedelta(minutes=1), InstanceStatus.WAITING),
        parked(future, now + timedelta(hours=1)),
        parked(paused, now - timedelta(minutes=3), InstanceStatus.PAUSED),
        parked(done, now - timedelta(minutes=3), InstanceStatus.COMPLETE),
    )

    async def claim(resend: float) -> list[InstanceKey]:
        timers = await contract.store.due_timers(limit=100_000, resend_after_seconds=resend)
        return [t.key for t in timers if t.key.tenant == contract.tenant]

    timers = await contract.store.due_timers(limit=100_000, resend_after_seconds=3600)
    mine = [t for t in timers if t.key.tenant == contract.tenant]
    assert [t.key for t in mine] == [sleeping, waiting]
    assert (mine[0].module, mine[0].position, mine[0].attempt, mine[0].generation) == (
        contract.module,
        1,
        1,
        0,
    )
    assert mine[0].wake_at == now - timedelta(minutes=2)
    assert await claim(3600) == []
    assert await claim(0) == [sleeping, waiting]
    await contract.write(parked(sleeping, now - timedelta(minutes=2)))
    assert await claim(3600) == [sleeping]


# -- events --------------------------------------------------------------------------------


async def test_events_are_stored_once_per_id(contract: Contract) -> None:
    a, b = await contract.create("a", "b")
    async with contract.store.transaction() as tx:
        first = [NewEvent(a, "e1", "paid", "1"), NewEvent(b, "e1", "paid", "1")]
        assert await tx.insert_events(first) == {a, b}
        assert await tx.insert_events([NewEvent(a, "e1", "paid", "again")]) == set()
    async with contract.store.transaction() as tx:
        assert await tx.insert_events([NewEvent(a, "e1", "paid", "again")]) == set()
        assert await tx.insert_events([NewEvent(a, "e2", "paid", "2")]) == {a}
        assert await tx.insert_events([]) == set()
        known = await tx.known_events([(a, "e1"), (b, "e2"), (b, "e1")])
        assert known == {a, b}
        assert await tx.known_events([(b, "e2")]) == set()
        assert await tx.known_events([]) == set()
    detail = await contract.store.detail(a)
    assert detail is not None
    assert detail.pending_events == 2


async def test_take_events_takes_the_oldest_once(contract: Contract) -> None:
    (key,) = await contract.create("waiter")
    async with contract.store.transaction() as tx:
        await tx.insert_events(
            [NewEvent(key, "z-first", "paid", "first"), NewEvent(key, "o", "other", "other")]
        )
    async with contract.store.transaction() as tx:
        # Same arrival time: the event id decides.
        await tx.insert_events(
            [NewEvent(key, "b", "paid", "third"), NewEvent(key, "a", "paid", "second")]
        )
        await tx.insert_events([NewEvent(key, "used", "paid", "used", consumed_seq=0)])
    payloads = []
    for seq in (3, 4, 5, 6):
        async with contract.store.transaction() as tx:
            taken = await tx.take_events([(key, "paid", seq)])
        payloads.append(taken[key][0] if taken else None)
    assert payloads == ["first", "second", "third", None]
    detail = await contract.store.detail(key)
    assert detail is not None
    assert detail.pending_events == 1
    async with contract.store.transaction() as tx:
        assert await tx.take_events([]) == {}
        taken = await tx.take_events([(key, "other", 7)])
        assert taken[key][0] == "other"
        assert await tx.take_events([(key, "other", 8)]) == {}


async def test_a_rolled_back_take_leaves_the_event(contract: Contract) -> None:
    (key,) = await contract.create("undo")
    async with contract.store.transaction() as tx:
        await tx.insert_events([NewEvent(key, "e", "paid", "it")])
    async with rolled_back(contract.store) as tx:
        assert key in await tx.take_events([(key, "paid", 1)])
    async with contract.store.transaction() as tx:
        assert (await tx.take_events([(key, "paid", 1)]))[key][0] == "it"


# -- limits --------------------------------------------------------------------------------


def _early(key: InstanceKey, event_id: str) -> EarlyEvent:
    letter = OutboxMessage("t.event", '{"x-dead-reason":"unknown-instance"}', b"{}", "dead")
    return EarlyEvent(NewEvent(key, event_id, "go", '"early"'), letter)


async def test_early_events_are_held_until_their_create_takes_them(contract: Contract) -> None:
    """Events held for an instance that does not exist become its stored events when a
    create inserts it (arrival order kept); for an existing instance nothing is held."""
    (existing,) = await contract.create("there")
    key = contract.key("soon")
    async with contract.store.transaction() as tx:
        found = await tx.hold_early_events(
            [_early(key, "e1"), _early(existing, "e9")], hold_seconds=60
        )
    assert found == EarlyHolding({existing}, [])
    async with contract.store.transaction() as tx:
        await tx.hold_early_events([_early(key, "e2"), _early(key, "e1")], hold_seconds=60)
    assert [h.event_id for h in await contract.store.held_events(key)] == ["e1", "e2"]
    assert await contract.store.held_events(existing) == []
    async with contract.store.transaction() as tx:
        await tx.create_instances([NewInstance(key, contract.module, "{}")])
        assert await tx.adopt_early_events([key]) == 2
        taken = await tx.take_events([(key, "go", 0)])
    assert taken[key][0] == '"early"'
    assert await contract.store.held_events(key) == []
    detail = await contract.store.detail(key)
    assert detail is not None
    assert detail.pending_events == 1


async def test_a_create_committed_during_a_hold_is_seen_by_it(contract: Contract) -> None:
    """A create that commits while an event's transaction waits to hold it is seen by the
    hold (the event is then not held), so no event is left behind by the race."""
    key = contract.key("racing")
    created = asyncio.Event()

    async def hold() -> set[InstanceKey]:
        await created.wait()
        async with contract.store.transaction() as tx:
            holding = await tx.hold_early_events([_early(key, "e1")], hold_seconds=60)
            return holding.existing

    task = asyncio.create_task(hold())
    async with contract.store.transaction() as tx:
        await tx.create_instances([NewInstance(key, contract.module, "{}")])
        await tx.adopt_early_events([key])
        created.set()
        await asyncio.sleep(0.05)
    assert await task == {key}
    assert await contract.store.held_events(key) == []


async def test_a_tenants_held_events_stay_within_its_share(contract: Contract) -> None:
    """Past its share of held bytes a tenant's early events are refused, not held; a repeat
    of one held already is never refused; other tenants have shares of their own; a create
    that takes its held events frees their share."""
    key, later = contract.key("big"), contract.key("later")
    other = InstanceKey(contract.tenant + "-other", "big")
    size = held_bytes(_early(key, "e1"))
    share = 2 * size + size // 2
    async with contract.store.transaction() as tx:
        first = await tx.hold_early_events(
            [_early(key, "e1"), _early(key, "e1"), _early(key, "e2"), _early(other, "e1")],
            hold_seconds=60,
            tenant_bytes=share,
        )
    assert first == EarlyHolding(set(), [])
    async with contract.store.transaction() as tx:
        second = await tx.hold_early_events(
            [_early(key, "e2"), _early(later, "e3"), _early(other, "e2")],
            hold_seconds=60,
            tenant_bytes=share,
        )
    assert [(e.event.key, e.event.event_id) for e in second.refused] == [(later, "e3")]
    assert [h.event_id for h in await contract.store.held_events(key)] == ["e1", "e2"]
    assert await contract.store.held_events(later) == []
    assert len(await contract.store.held_events(other)) == 2
    async with contract.store.transaction() as tx:
        await tx.create_instances([NewInstance(key, contract.module, "{}")])
        assert await tx.adopt_early_events([key]) == 2
    async with contract.store.transaction() as tx:
        third = await tx.hold_early_events(
            [_early(later, "e3")], hold_seconds=60, tenant_bytes=share
        )
    assert third == EarlyHolding(set(), [])
    assert [h.event_id for h in await contract.store.held_events(later)] == ["e3"]


async def test_grant_slots_shares_the_cap_between_transactions(contract: Contract) -> None:
    tenant = contract.tenant
    async with contract.store.transaction() as first:
        assert await first.grant_slots(tenant, 3, 2) == 2
        async with contract.store.transaction() as second:
            assert await second.grant_slots(tenant, 3, 5) == 1
            assert await second.grant_slots(tenant, 3, 5) == 1
            assert await second.grant_slots(tenant, 0, 5) == 0
        async with contract.store.transaction() as third:
            assert await third.grant_slots(tenant, 3, 5) == 1
    async with contract.store.transaction() as fourth:
        assert await fourth.grant_slots(tenant, 3, 5) == 3
        assert await fourth.grant_slots(tenant, 3, 0) == 0


async def test_take_tokens_goes_into_debt(contract: Contract) -> None:
    fast, slow = f"{contract.tenant}-fast", f"{contract.tenant}-slow"
    async with contract.store.transaction() as tx:
        # A fresh bucket is full (a second's worth); within a transaction no time passes.
        assert await tx.take_tokens(fast, 5, 2) == 5
        assert await tx.take_tokens(fast, 5, 2) == 3
        assert await tx.take_tokens(slow, 0.001, 3) == 1
    async with rolled_back(contract.store) as tx:
        await tx.take_tokens(slow, 0.001, 50)
    async with contract.store.transaction() as tx:
        assert await tx.take_tokens(slow, 0.001, 1) == pytest.approx(-2, abs=0.01)
        assert await tx.take_tokens(slow, 0.001, 0) == pytest.approx(-3, abs=0.01)


# -- modules -------------------------------------------------------------------------------


async def test_modules_are_pushed_per_tenant(contract: Contract) -> None:
    wasm = b"\0asm\1\0\0\0" + uuid.uuid4().bytes
    digest, other = digest_of(wasm), f"{contract.tenant}-other"
    assert await contract.store.put_module(contract.tenant, digest, wasm)
    assert not await contract.store.put_module(contract.tenant, digest, wasm)
    assert await contract.store.put_module(other, digest, wasm)
    missing = digest_of(b"never pushed")
    assert await contract.store.module_bytes([digest, missing]) == {digest: wasm}
    assert await contract.store.module_bytes([]) == {}
    async with contract.store.transaction() as tx:
        assert await tx.module_bytes([missing, digest]) == {digest: wasm}
        pairs = {(contract.tenant, digest), (f"{contract.tenant}-x", digest), (other, missing)}
        assert await tx.owned_modules(pairs) == {(contract.tenant, digest)}
        assert await tx.owned_modules(set()) == set()


# -- memory only: the injected clock -------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def memory(clock: Clock) -> Contract:
    store = MemoryStore(clock=clock, retention_seconds=100)
    wasm = b"\0asm\1\0\0\0"
    await store.put_module("acme", digest_of(wasm), wasm)
    return Contract(store, "acme", digest_of(wasm), IntegrityViolation, clock)


async def test_memory_timers_fall_due_as_the_clock_moves(memory: Contract, clock: Clock) -> None:
    (key,) = await memory.create("nap")
    await memory.write(parked(key, clock.at + timedelta(seconds=60)))
    assert await memory.store.due_timers(limit=10, resend_after_seconds=30) == []
    clock.advance(60)
    assert [t.key for t in await memory.store.due_timers(limit=10, resend_after_seconds=30)] == [
        key
    ]
    clock.advance(29)
    assert await memory.store.due_timers(limit=10, resend_after_seconds=30) == []
    clock.advance(1)
    assert [t.key for t in await memory.store.due_timers(limit=0, resend_after_seconds=30)] == []
    assert [t.key for t in await memory.store.due_timers(limit=1, resend_after_seconds=30)] == [key]


async def test_memory_outbox_age_and_retention_follow_the_clock(
    memory: Contract, clock: Clock
) -> None:
    assert isinstance(memory.store, MemoryStore)
    (key,) = await memory.create("old")
    ids = await memory.write(StepWrite(key, InstanceStatus.ERRORED, 0), outbox=[message("m")])
    detail = await memory.store.detail(key)
    assert detail is not None
    assert detail.record.retain_until == clock.at + timedelta(seconds=100)
    async with memory.store.claim_outbox(older_than_seconds=10, limit=10) as claimed:
        assert claimed == []
    clock.advance(10)
    async with memory.store.claim_outbox(older_than_seconds=10, limit=10) as claimed:
        assert [i for i, _ in claimed] == ids
    assert memory.store.outbox() == []


async def test_memory_bucket_refills_by_the_clock(memory: Contract, clock: Clock) -> None:
    async with memory.store.transaction() as tx:
        assert await tx.take_tokens("acme", 2, 6) == 2
    clock.advance(1.5)
    async with memory.store.transaction() as tx:
        assert await tx.take_tokens("acme", 2, 0) == pytest.approx(-1, abs=0.01)
    clock.advance(100)
    async with memory.store.transaction() as tx:
        assert await tx.take_tokens("acme", 2, 0) == 2


async def test_memory_aborts_a_transaction_after_a_violation(memory: Contract) -> None:
    (key,) = await memory.create("abort")
    async with memory.store.transaction() as tx:
        with pytest.raises(IntegrityViolation):
            await tx.write_batch(
                [StepWrite(key, InstanceStatus.RUNNING, 2, (entry(0), entry(0)))], []
            )
        with pytest.raises(StoreError, match="aborted"):
            await tx.lock_instances([key])
    async with memory.store.transaction() as tx:
        with pytest.raises(IntegrityViolation):
            await tx.create_instances([NewInstance(memory.key("x"), digest_of(b"none"), "{}")])
    assert await memory.store.detail(memory.key("x")) is None


# -- connections -----------------------------------------------------------------------------


@pytest.mark.services
async def test_a_store_without_pre_ping_pays_one_error_for_lost_connections(
    database_url: str,
) -> None:
    """A worker's store lends connections untested: when PostgreSQL drops them all, one
    statement fails with StoreUnavailable (its batch is retried) and the pools start over."""
    store = PgStore(database_url, pre_ping=False)
    try:
        assert await store.write_unchanged([], confirmed_outbox=[-1]) == {}
        async with store.transaction() as tx:
            await tx.lock_instances([])
        admin = create_engine(database_url, poolclass=NullPool)
        with admin.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        admin.dispose()
        with pytest.raises(StoreUnavailable):
            await store.write_unchanged([], confirmed_outbox=[-1])
        assert await store.write_unchanged([], confirmed_outbox=[-1]) == {}
        with pytest.raises(StoreUnavailable):
            async with store.transaction() as tx:
                await tx.lock_instances([InstanceKey("t", "i")])
        async with store.transaction() as tx:
            assert await tx.lock_instances([InstanceKey("t", "i")]) == {}
    finally:
        await store.close()
