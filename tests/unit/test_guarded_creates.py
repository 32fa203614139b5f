"""Guarded creates (cycle/created.py): a create's first run goes before any transaction and
one statement writes it. These run on MemoryStore here, and on PgStore in
tests/integration/test_guarded_creates.py (the same tests, another `make_store`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from stepfleet.broker import Outgoing, Topology
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.engine import EngineLimits
from stepfleet.schemas import (
    CallRequested,
    Completed,
    EntryKind,
    EventAwaited,
    GuestReport,
    HttpRequest,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    StepSucceeded,
    TenantLimits,
    digest_of,
)
from stepfleet.store import InstanceDetail, MemoryStore, StepStore, TenantRecord
from stepfleet.workers.batch import BatchProcessor, BatchResult
from tests.fakes import Acks, FunctionSandbox, delivery

TOPOLOGY = Topology("test")

StoreMaker = Callable[[str, TenantLimits], Awaitable[StepStore]]
"""Makes the store under test, with the tenant (of these limits) it needs."""


def two_steps(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Steps "reserve" and "charge", then complete."""
    names = ("reserve", "charge")
    seq = len(entries)
    if seq < len(names):
        return GuestReport(StepSucceeded(seq, names[seq], json.dumps(names[seq])))
    return GuestReport(Completed(seq, "2"))


def step_then_go(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Step "reserve", then wait for a "go" event, then complete with its payload."""
    if not entries:
        return GuestReport(StepSucceeded(0, "reserve", '"r"'))
    if len(entries) == 1:
        return GuestReport(EventAwaited(1, "approval", "go", 60_000))
    return GuestReport(Completed(2, entries[1].value))


def waits_for_go(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Waits for a "go" event first, then completes with its payload."""
    if not entries:
        return GuestReport(EventAwaited(0, "approval", "go", 60_000))
    return GuestReport(Completed(1, entries[0].value))


def calls_first(entries: Sequence[JournalEntry], attempt: int, answers: Any) -> GuestReport:
    """Its first step makes an HTTP call."""
    if not entries and not answers:
        request = HttpRequest("GET", "http://api.test/")
        return GuestReport(CallRequested(0, "fetch", request, (), deadline=float("inf")))
    return GuestReport(Completed(len(entries), "1"))


class _Undone(Exception):
    """Ends a block so that it is undone."""


class _Counting:
    """The store, counting the step transactions the cycle opens (not those its guarded
    writes may open inside the store)."""

    def __init__(self, store: StepStore, fleet: Fleet) -> None:
        self._store, self._fleet = store, fleet

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        self._fleet.transactions += 1
        return self._store.transaction()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Fleet:
    """One BatchProcessor over the store under test, for a tenant of its own; counts the
    step transactions it opens."""

    def __init__(self, store: StepStore, tenant: str, guest: Any, *, calling: bool = False):
        self.store = store
        self.tenant = tenant
        self.module = digest_of(b"\0asm" + tenant.encode())
        self.other_module = digest_of(b"\0asm other" + tenant.encode())
        functions = {self.module: guest, self.other_module: two_steps}
        self.sandbox = (
            FunctionSandbox({self.other_module: two_steps}, calling={self.module: guest})
            if calling
            else FunctionSandbox(functions)
        )
        self.published: list[Outgoing] = []
        self.acks = Acks()
        self.transactions = 0
        self.inbox: list[Any] = []

    async def start(self, limits: TenantLimits, local_steps: int, chain_steps: int) -> Fleet:
        directory = TenantDirectory(EngineLimits())
        directory.load([TenantRecord(self.tenant, None, limits)])
        await self.store.put_module(self.tenant, self.module, b"\0asm" + self.tenant.encode())
        await self.store.put_module(
            self.tenant, self.other_module, b"\0asm other" + self.tenant.encode()
        )

        async def publish(messages: Sequence[Outgoing]) -> None:
            self.published.extend(messages)

        self.processor = BatchProcessor(
            store=_Counting(self.store, self),  # type: ignore[arg-type]
            sandbox=self.sandbox,
            wasm_thread=None,
            topology=TOPOLOGY,
            publish=publish,
            max_message_bytes=64 * 1024,
            directory=directory,
            resume=self.inbox.append,
            local_steps=local_steps,
            chain_steps=chain_steps,
            early_event_seconds=60,
        )
        return self

    def message(self, kind: str, instance: str, body: object, module: str | None = None) -> Any:
        headers = {
            "x-tenant": self.tenant,
            "x-instance-id": instance,
            "x-kind": kind,
            "x-schema-version": "1",
        }
        if kind != "event":
            headers["x-module"] = module or self.module
        return delivery(self.acks, headers, json.dumps(body).encode())

    def create(self, instance: str, module: str | None = None) -> Any:
        return self.message("create", instance, {"version": 1, "params": {"n": 1}}, module)

    def event(self, instance: str, event_id: str, payload: object) -> Any:
        body = {"version": 1, "event_id": event_id, "type": "go", "payload": payload}
        return self.message("event", instance, body)

    async def process(self, *deliveries: Any) -> tuple[BatchResult, int]:
        """Process one batch; return its result and the transactions it opened."""
        before = self.transactions
        result = await self.processor.process(list(deliveries))
        return result, self.transactions - before

    async def handed_back(self) -> list[Any]:
        """Wait (up to 5 s) for a call's task to hand its delivery back; take the inbox."""
        for _ in range(500):
            if self.inbox:
                break
            await asyncio.sleep(0.01)
        taken, self.inbox[:] = list(self.inbox), []
        return taken

    async def warm(self) -> None:
        """A first create, through the transaction: the module is known pushed and loaded."""
        result, opened = await self.process(self.create("warm"))
        assert (result.steps, opened) == (1, 1)

    async def forward(self) -> None:
        """Deliver the step messages published so far, as the broker would."""
        steps = [m for m in self.published if m.exchange == TOPOLOGY.internal_exchange]
        self.published = [m for m in self.published if m not in steps]
        for m in steps:
            await self.processor.process(
                [delivery(self.acks, dict(m.headers), m.body, routing_key=m.routing_key)]
            )

    async def detail(self, instance: str) -> InstanceDetail:
        detail = await self.store.detail(InstanceKey(self.tenant, instance))
        assert detail is not None
        return detail

    async def outbox_ids(self) -> set[int]:
        """This tenant's outbox rows not deleted yet (read by a claim that deletes nothing)."""
        seen: set[int] = set()
        try:
            async with self.store.claim_outbox(older_than_seconds=0, limit=100_000) as rows:
                seen = {i for i, m in rows if json.loads(m.headers)["x-tenant"] == self.tenant}
                raise _Undone
        except _Undone:
            pass
        return seen

    def dead_reasons(self) -> list[str]:
        return [
            str(m.headers["x-dead-reason"])
            for m in self.published
            if m.exchange == TOPOLOGY.dead_letter_exchange
        ]


def same_row(one: InstanceDetail, other: InstanceDetail) -> bool:
    """Whether two instances' rows and journals are alike but for their ids and times."""
    columns = ("status", "position", "generation", "attempt", "waiting", "mode", "state_bytes")
    return (
        all(getattr(one.record, c) == getattr(other.record, c) for c in columns)
        and (one.record.output, one.record.error) == (other.record.output, other.record.error)
        and one.params == other.params
        and [(e.seq, e.kind, e.name, e.value) for e in one.journal]
        == [(e.seq, e.kind, e.name, e.value) for e in other.journal]
    )


async def memory_store(tenant: str, limits: TenantLimits) -> StepStore:
    return MemoryStore()


@pytest.fixture
def make_store() -> StoreMaker:
    return memory_store


@pytest.fixture
def fleet_of(make_store: StoreMaker) -> Callable[..., Awaitable[Fleet]]:
    async def make(
        guest: Any = two_steps,
        *,
        limits: TenantLimits | None = None,
        local_steps: int = 0,
        chain_steps: int = 16,
        calling: bool = False,
    ) -> Fleet:
        tenant = f"g{uuid.uuid4().hex[:10]}"
        own = limits or TenantLimits()
        store = await make_store(tenant, own)
        return await Fleet(store, tenant, guest, calling=calling).start(
            own, local_steps, chain_steps
        )

    return make


FleetOf = Callable[..., Awaitable[Fleet]]


async def test_a_create_is_written_without_a_transaction(fleet_of: FleetOf) -> None:
    fleet = await fleet_of(chain_steps=1)  # one step per write
    await fleet.warm()
    create = fleet.create("o-1")
    result, opened = await fleet.process(create)
    assert (result.steps, result.duplicates, opened) == (1, 0, 0)
    assert fleet.acks.acked[-1] is create
    detail, warm = await fleet.detail("o-1"), await fleet.detail("warm")
    assert (detail.record.status, detail.record.position) == (InstanceStatus.RUNNING, 1)
    assert [e.name for e in detail.journal] == ["reserve"]
    # As the transaction writes a create (the warm one, of the same params).
    assert same_row(detail, warm)
    await fleet.forward()
    await fleet.forward()
    done = await fleet.detail("o-1")
    assert (done.record.status, done.record.output) == (InstanceStatus.COMPLETE, "2")


async def test_a_guarded_create_goes_on_locally_as_any_next_step(fleet_of: FleetOf) -> None:
    fleet = await fleet_of(local_steps=4, chain_steps=1)  # one step per write
    await fleet.warm()
    fleet.inbox.clear()
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (1, 0)
    for _ in range(2):
        [local] = fleet.inbox
        fleet.inbox.clear()
        result, opened = await fleet.process(local)
        assert (result.steps, opened) == (1, 0)
    detail = await fleet.detail("o-1")
    assert (detail.record.status, detail.record.output) == (InstanceStatus.COMPLETE, "2")
    assert [m for m in fleet.published if m.exchange == TOPOLOGY.internal_exchange] == []


async def test_a_repeated_create_is_a_duplicate_and_writes_nothing(fleet_of: FleetOf) -> None:
    fleet = await fleet_of()
    await fleet.warm()
    await fleet.process(fleet.create("o-1"))
    before, steps = await fleet.detail("o-1"), len(fleet.published)
    again = fleet.create("o-1")
    result, opened = await fleet.process(again)
    assert (result.steps, result.duplicates, result.dead_letters, opened) == (0, 1, 0, 0)
    assert fleet.acks.acked[-1] is again
    assert await fleet.detail("o-1") == before
    assert len(fleet.published) == steps


async def test_a_create_of_other_code_for_an_existing_row_is_refused(fleet_of: FleetOf) -> None:
    fleet = await fleet_of()
    await fleet.warm()
    await fleet.process(fleet.create("o-1"))
    await fleet.process(fleet.create("o-2", fleet.other_module))  # known and loaded, too
    result, opened = await fleet.process(fleet.create("o-1", fleet.other_module))
    assert (result.steps, result.dead_letters, opened) == (0, 1, 1)
    assert fleet.dead_reasons() == ["module-mismatch"]


async def test_events_held_for_a_guarded_create_are_taken_by_a_later_wait(
    fleet_of: FleetOf,
) -> None:
    fleet = await fleet_of(step_then_go)
    await fleet.warm()
    held, _ = await fleet.process(fleet.event("o-1", "e-1", {"ok": True}))
    assert held.dead_letters == 0
    assert len(await fleet.store.held_events(InstanceKey(fleet.tenant, "o-1"))) == 1
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (1, 0)
    assert await fleet.store.held_events(InstanceKey(fleet.tenant, "o-1")) == []
    assert (await fleet.detail("o-1")).pending_events == 1
    await fleet.forward()  # its wait takes the event
    await fleet.forward()
    detail = await fleet.detail("o-1")
    assert (detail.record.status, detail.record.output) == (
        InstanceStatus.COMPLETE,
        '{"ok":true}',
    )
    assert [e.kind for e in detail.journal][1] is EntryKind.EVENT_RECEIVED


async def test_a_first_run_that_waits_for_an_event_goes_through_the_transaction(
    fleet_of: FleetOf,
) -> None:
    fleet = await fleet_of(waits_for_go)
    await fleet.warm()
    await fleet.process(fleet.event("o-1", "e-1", {"ok": True}))  # held for its create
    runs = len(fleet.sandbox.runs)
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (1, 1)
    assert len(fleet.sandbox.runs) == runs + 1  # the transaction took the run made first
    detail = await fleet.detail("o-1")
    assert detail.record.waiting is None  # the held event ended the wait at once
    await fleet.forward()
    assert (await fleet.detail("o-1")).record.status is InstanceStatus.COMPLETE


async def test_a_first_run_that_stops_at_a_call_is_written_without_a_transaction(
    fleet_of: FleetOf,
) -> None:
    fleet = await fleet_of(calls_first, calling=True)
    await fleet.process(fleet.create("warm"))  # through the transaction: the module is new
    runs = len(fleet.sandbox.runs)
    outbox = await fleet.outbox_ids()
    create = fleet.create("o-1")
    result, opened = await fleet.process(create)
    assert (result.steps, opened) == (0, 0)
    assert len(fleet.sandbox.runs) == runs + 1
    assert fleet.processor.holds(create)  # its row is written, its call under way
    assert create not in fleet.acks.acked
    detail, warm = await fleet.detail("o-1"), await fleet.detail("warm")
    assert (detail.record.status, detail.journal) == (InstanceStatus.RUNNING, [])
    # The row the transaction wrote for the first create, and the same step message kept
    # in the outbox (published only by the relay, should the attempt never end).
    assert same_row(detail, warm)
    assert len(await fleet.outbox_ids() - outbox) == 1
    assert not [m for m in fleet.published if m.exchange == TOPOLOGY.internal_exchange]

    handed: list[Any] = []
    while len(handed) < 2:  # both answers, the warm one's too
        handed += await fleet.handed_back()
    assert id(create) in {id(d) for d in handed}
    result, opened = await fleet.process(*handed)
    assert (result.steps, opened) == (2, 0)  # the answers' runs, written by a guarded statement
    assert create in fleet.acks.acked
    assert (await fleet.detail("o-1")).record.status is InstanceStatus.COMPLETE
    assert await fleet.outbox_ids() <= outbox  # its kept step message is gone


async def test_a_create_stopped_at_a_call_delivered_again_is_a_duplicate(
    fleet_of: FleetOf,
) -> None:
    fleet = await fleet_of(calls_first, calling=True)
    await fleet.process(fleet.create("warm"))
    create = fleet.create("o-1")
    await fleet.process(create)
    before = await fleet.detail("o-1")
    again = fleet.create("o-1")  # the producer's retry, while the first one's call is made
    result, opened = await fleet.process(again)
    assert (result.steps, opened) == (0, 0)
    assert fleet.acks.acked[-1] is again
    assert not fleet.processor.holds(again)
    assert await fleet.detail("o-1") == before


async def test_a_tenant_with_quotas_creates_through_the_transaction(fleet_of: FleetOf) -> None:
    fleet = await fleet_of(limits=TenantLimits(running_steps=10))
    await fleet.warm()
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (1, 1)


async def test_a_create_of_a_module_never_pushed_is_dead_lettered(fleet_of: FleetOf) -> None:
    fleet = await fleet_of()
    await fleet.warm()
    never = digest_of(b"never pushed")
    fleet.sandbox.modules[never] = two_steps  # even one the sandbox could run
    result, opened = await fleet.process(fleet.create("o-1", never))
    assert (result.steps, result.dead_letters, opened) == (0, 1, 1)
    assert fleet.dead_reasons() == ["unknown-module"]
    assert await fleet.store.detail(InstanceKey(fleet.tenant, "o-1")) is None


async def test_confirmed_outbox_rows_go_with_the_guarded_create(fleet_of: FleetOf) -> None:
    fleet = await fleet_of()
    await fleet.warm()
    [confirmed] = fleet.processor.confirmed_outbox  # the warm create's step, published
    assert confirmed in await fleet.outbox_ids()
    result, opened = await fleet.process(fleet.create("o-1"))
    assert opened == 0
    assert fleet.processor.confirmed_outbox == result.outbox_ids
    assert await fleet.outbox_ids() == set(result.outbox_ids)
