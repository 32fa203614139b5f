"""The fleet's batch logic on the in-memory store: admission, quotas, the group write,
dead-lettering and giving up, with fake deliveries and a function for a guest. No services."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest

from stepfleet.broker import Outgoing, Topology
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.messages import from_outbox
from stepfleet.cycle.runner import SLICE_FUEL, TURN_SECONDS
from stepfleet.engine import EngineLimits
from stepfleet.schemas import (
    CallRequested,
    Completed,
    EntryKind,
    EventAwaited,
    GuestReport,
    HttpRequest,
    HttpResponse,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    StepFailed,
    StepSucceeded,
    TenantLimits,
    WaitKind,
)
from stepfleet.store import MemoryStore, StepWrite, StoreUnavailable, TenantRecord
from stepfleet.workers.batch import BatchProcessor
from tests.conftest import capture_logs
from tests.fakes import Acks, FunctionSandbox, delivery

TENANT = "acme"
OTHER = "beta"
MODULE = "sha256:" + "ab" * 32
TOPOLOGY = Topology("test")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def two_steps(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Steps "reserve" and "charge", then complete with the number of steps."""
    names = ("reserve", "charge")
    seq = len(entries)
    if seq < len(names):
        return GuestReport(StepSucceeded(seq, names[seq], json.dumps(names[seq])), (), [(1, "hi")])
    return GuestReport(Completed(seq, "2"))


def waits_for_go(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Waits for a "go" event, then completes with its payload."""
    if not entries:
        return GuestReport(EventAwaited(0, "approval", "go", 60_000))
    return GuestReport(Completed(1, entries[0].value))


class FailingWrites:
    """The store, but the write at the end of each transaction fails as a lost database
    connection would."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    @asynccontextmanager
    async def transaction(self):
        async with self._store.transaction() as tx:

            async def write_batch(*args, **kwargs):
                raise StoreUnavailable("the store went away")

            yield _Patched(tx, write_batch=write_batch)


class _Patched:
    def __init__(self, inner, **overrides) -> None:
        self._inner, self._overrides = inner, overrides

    def __getattr__(self, name):
        return self._overrides.get(name) or getattr(self._inner, name)


class Fleet:
    """One BatchProcessor over a MemoryStore, and what it published."""

    def __init__(
        self,
        guest=two_steps,
        limits: TenantLimits | None = None,
        local_steps: int = 0,
        chain_steps: int = 16,
        sandbox=None,
        wasm_thread=None,
        caller=None,
        early_event_seconds: float = 0.0,
        early_event_tenant_bytes: int | None = None,
        guest_processes=None,
    ) -> None:
        self.now = T0
        self.inbox: list = []
        """Deliveries the processor handed back to the worker's inbox (local next steps)."""
        self.store = MemoryStore(clock=lambda: self.now)
        self.published: list[Outgoing] = []
        self.acks = Acks()
        directory = TenantDirectory(EngineLimits())
        if limits is not None:
            directory.load([TenantRecord(TENANT, None, limits)])

        async def publish(messages: Sequence[Outgoing]) -> None:
            self.published.extend(messages)

        self.processor = BatchProcessor(
            store=self.store,
            sandbox=sandbox or FunctionSandbox({MODULE: guest}),
            wasm_thread=wasm_thread,
            guest_processes=guest_processes,
            topology=TOPOLOGY,
            publish=publish,
            max_message_bytes=64 * 1024,
            clock=lambda: self.now,
            directory=directory,
            caller=caller,
            resume=self.inbox.append,
            local_steps=local_steps,
            chain_steps=chain_steps,
            early_event_seconds=early_event_seconds,
            early_event_tenant_bytes=early_event_tenant_bytes,
        )

    async def handed_back(self) -> list:
        """Wait (up to 5 s) for a call's task to hand its delivery back; take the inbox."""
        for _ in range(500):
            if self.inbox:
                break
            await asyncio.sleep(0.01)
        taken = list(self.inbox)
        self.inbox.clear()  # in place: the processor appends to this very list
        return taken

    async def push(self) -> None:
        await self.store.put_module(TENANT, MODULE, b"\0asm")

    def message(self, kind: str, instance: str, body: object, **headers: str):
        base = {
            "x-tenant": TENANT,
            "x-instance-id": instance,
            "x-kind": kind,
            "x-schema-version": "1",
        }
        if kind != "event":
            base["x-module"] = MODULE
        return delivery(self.acks, {**base, **headers}, json.dumps(body).encode())

    def create(self, instance: str, params: object = None):
        return self.message("create", instance, {"version": 1, "params": params or {}})

    def event(self, instance: str, event_id: str, payload: object, type_: str = "go"):
        body = {"version": 1, "event_id": event_id, "type": type_, "payload": payload}
        return self.message("event", instance, body)

    def steps(self) -> list[Outgoing]:
        return [m for m in self.published if m.exchange == TOPOLOGY.internal_exchange]

    def dead(self) -> list[Outgoing]:
        return [m for m in self.published if m.exchange == TOPOLOGY.dead_letter_exchange]

    async def forward(self) -> None:
        """Deliver the step messages published so far, as the broker would."""
        pending, self.published = self.steps(), [m for m in self.published if m not in self.steps()]
        for message in pending:
            sent = delivery(
                self.acks,
                dict(message.headers),
                message.body,
                routing_key=message.routing_key,
                exchange=message.exchange,
            )
            await self.processor.process([sent])

    async def status(self, instance: str):
        detail = await self.store.detail(InstanceKey(TENANT, instance))
        assert detail is not None
        return detail


async def test_a_create_runs_its_first_step_and_queues_the_next():
    fleet = Fleet()
    await fleet.push()
    create = fleet.create("o-1")
    result = await fleet.processor.process([create])
    assert (result.steps, result.dead_letters, result.duplicates) == (1, 0, 0)
    detail = await fleet.status("o-1")
    assert [e.name for e in detail.journal] == ["reserve"]
    assert detail.record.status is InstanceStatus.RUNNING
    [step] = fleet.steps()
    assert step.headers["x-kind"] == "step"
    assert json.loads(step.body)["position"] == 1
    assert fleet.acks.acked == [create]
    assert result.outbox_ids  # kept until the publish is confirmed


async def test_a_workflow_finishes_through_its_step_messages():
    fleet = Fleet()
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1", {"n": 1})])
    await fleet.forward()
    await fleet.forward()
    detail = await fleet.status("o-1")
    assert (detail.record.status, detail.record.output) == (InstanceStatus.COMPLETE, "2")
    assert [e.name for e in detail.journal] == ["reserve", "charge"]
    assert fleet.steps() == []


async def test_a_next_step_with_room_runs_here_without_a_publish_and_its_row_goes_with_it():
    fleet = Fleet(local_steps=2, chain_steps=1)  # one step per write
    await fleet.push()
    create = fleet.create("o-1")
    result = await fleet.processor.process([create])
    assert (fleet.steps(), result.outbox_ids) == ([], [])
    [local] = fleet.inbox
    assert fleet.processor.holds(local)
    assert local.headers["x-kind"] == "step"
    [(row_id, kept)] = fleet.store.outbox()  # durable until the step is written
    assert json.loads(kept.body)["position"] == 1
    fleet.inbox.clear()
    await fleet.processor.process([local])
    [after] = fleet.inbox
    assert fleet.processor.holds(after)
    assert not fleet.processor.holds(local)
    assert row_id not in [i for i, _ in fleet.store.outbox()]
    fleet.inbox.clear()
    await fleet.processor.process([after])
    detail = await fleet.status("o-1")
    assert (detail.record.status, detail.record.output) == (InstanceStatus.COMPLETE, "2")
    assert [e.name for e in detail.journal] == ["reserve", "charge"]
    assert (fleet.store.outbox(), fleet.steps(), fleet.inbox) == ([], [], [])
    assert fleet.acks.acked == [create]


async def test_a_local_next_step_is_written_by_one_guarded_write():
    fleet = Fleet(local_steps=2, chain_steps=1)  # one step per write
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    guarded: list[list[str]] = []
    write_unchanged = fleet.store.write_unchanged

    async def watched(writes, **kwargs):
        guarded.append([g.write.key.instance_id for g in writes])
        return await write_unchanged(writes, **kwargs)

    fleet.store.write_unchanged = watched  # type: ignore[method-assign]
    for _ in range(2):
        [local] = fleet.inbox
        fleet.inbox.clear()
        await fleet.processor.process([local])
    assert guarded == [["o-1"], ["o-1"]]
    detail = await fleet.status("o-1")
    assert (detail.record.status, detail.record.output) == (InstanceStatus.COMPLETE, "2")
    assert [e.name for e in detail.journal] == ["reserve", "charge"]
    assert (fleet.store.outbox(), fleet.steps(), fleet.inbox) == ([], [], [])


async def test_a_local_next_step_of_an_instance_paused_meanwhile_is_not_written():
    fleet = Fleet(local_steps=1)
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    [local] = fleet.inbox
    fleet.inbox.clear()
    key = InstanceKey(TENANT, "o-1")
    async with fleet.store.transaction() as tx:  # an operator's pause, between two steps
        row = (await tx.lock_instances([key]))[key]
        paused = StepWrite(
            key,
            InstanceStatus.PAUSED,
            row.position,
            attempt=row.attempt,
            state_bytes=row.state_bytes,
        )
        await tx.write_batch([paused], [])
    result = await fleet.processor.process([local])
    assert (result.steps, result.duplicates) == (0, 1)
    detail = await fleet.status("o-1")
    assert detail.record.status is InstanceStatus.PAUSED
    assert [e.name for e in detail.journal] == ["reserve"]
    assert (fleet.inbox, fleet.steps()) == ([], [])


def step_then_go(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Step "reserve", then wait for a "go" event, then complete with its payload."""
    if not entries:
        return GuestReport(StepSucceeded(0, "reserve", '"r"'))
    if len(entries) == 1:
        return GuestReport(EventAwaited(1, "approval", "go", 60_000))
    return GuestReport(Completed(2, entries[1].value))


async def test_a_local_next_step_that_begins_a_wait_takes_the_event_stored_before_it():
    fleet = Fleet(guest=step_then_go, local_steps=2)
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    await fleet.processor.process([fleet.event("o-1", "e-1", {"ok": True})])  # kept for later
    for _ in range(2):
        [local] = fleet.inbox
        fleet.inbox.clear()
        await fleet.processor.process([local])
    detail = await fleet.status("o-1")
    assert (detail.record.status, detail.record.output) == (
        InstanceStatus.COMPLETE,
        '{"ok":true}',
    )


async def test_next_steps_past_the_room_or_after_stop_are_published():
    fleet = Fleet(local_steps=2, chain_steps=1)  # one step per write
    await fleet.push()
    await fleet.processor.process([fleet.create(f"o-{i}") for i in range(3)])
    assert (len(fleet.inbox), len(fleet.steps())) == (2, 1)
    fleet.processor.stop_continuing()
    await fleet.processor.process(fleet.inbox)
    assert len(fleet.steps()) == 3  # the two that ran here published their next steps
    await fleet.forward()
    await fleet.forward()
    for i in range(3):
        assert (await fleet.status(f"o-{i}")).record.status is InstanceStatus.COMPLETE


async def test_a_local_next_step_that_became_a_duplicate_leaves_no_row_to_relay():
    fleet = Fleet(local_steps=1)
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    [local] = fleet.inbox
    [(row_id, kept)] = fleet.store.outbox()
    # The relay published the row meanwhile and another delivery ran the step first.
    relayed = delivery(
        fleet.acks, json.loads(kept.headers), kept.body, routing_key=kept.routing_key
    )
    fleet.processor.stop_continuing()
    await fleet.processor.process([relayed])
    result = await fleet.processor.process([local])
    assert result.duplicates == 1
    await fleet.processor.process([])  # the next transaction deletes what the last confirmed
    assert row_id not in [i for i, _ in fleet.store.outbox()]


async def test_one_batch_writes_every_instance_and_defers_a_second_message_for_one():
    fleet = Fleet()
    await fleet.push()
    creates = [fleet.create(f"o-{i}") for i in range(5)]
    again = fleet.create("o-0")
    result = await fleet.processor.process([*creates, again])
    assert result.steps == 5
    assert result.deferred == [again]
    assert again not in fleet.acks.acked
    for i in range(5):
        assert [e.seq for e in (await fleet.status(f"o-{i}")).journal] == [0]
    assert len(fleet.steps()) == 5


async def test_a_repeated_create_is_a_duplicate():
    fleet = Fleet()
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    result = await fleet.processor.process([fleet.create("o-1")])
    assert (result.steps, result.duplicates, result.dead_letters) == (0, 1, 0)
    assert len((await fleet.status("o-1")).journal) == 1


async def test_bad_messages_are_dead_lettered_and_the_rest_of_the_batch_commits():
    fleet = Fleet()
    await fleet.push()
    good = fleet.create("o-1")
    nul = fleet.message("create", "o-2", {"version": 1}, **{"x-tenant": "ac\x00me"})
    unknown = fleet.message("create", "o-3", {"version": 1}, **{"x-module": "sha256:" + "0" * 64})
    not_json = delivery(fleet.acks, dict(good.headers), b"{nope")
    result = await fleet.processor.process([good, nul, unknown, not_json])
    assert result.steps == 1
    reasons = sorted(m.headers["x-dead-reason"] for m in fleet.dead())
    assert reasons == ["bad-body", "bad-header", "unknown-module"]
    assert len(fleet.acks.acked) == 4


async def test_an_event_before_its_create_is_held_and_taken_by_the_first_wait():
    """An event for an instance that does not exist yet is held (acknowledged, no dead
    letter); the create that comes later stores it, and the first run's wait takes it in the
    create's own transaction."""
    fleet = Fleet(guest=waits_for_go, early_event_seconds=60)
    await fleet.push()
    early = await fleet.processor.process([fleet.event("o-1", "e-1", {"ok": True})])
    assert (early.dead_letters, len(fleet.acks.acked)) == (0, 1)
    [held] = await fleet.store.held_events(InstanceKey(TENANT, "o-1"))
    assert (held.event_id, held.type) == ("e-1", "go")
    assert held.expires_at == fleet.now + timedelta(seconds=60)
    await fleet.processor.process([fleet.create("o-1")])
    await fleet.forward()
    detail = await fleet.status("o-1")
    assert (detail.record.status, detail.record.output) == (
        InstanceStatus.COMPLETE,
        '{"ok":true}',
    )
    assert [e.kind for e in detail.journal] == [EntryKind.EVENT_RECEIVED]
    assert await fleet.store.held_events(InstanceKey(TENANT, "o-1")) == []
    assert not fleet.dead()


async def test_an_event_whose_instance_never_comes_is_dead_lettered_after_the_hold():
    """A held event whose create never comes gets its unknown-instance letter queued in the
    outbox once the hold ends, with the event's body, message id and the worker's headers."""
    fleet = Fleet(early_event_seconds=60)
    message = fleet.event("ghost", "e-1", {})
    await fleet.processor.process([message])
    assert await fleet.store.expire_early_events(limit=10) == 0
    fleet.now += timedelta(seconds=61)
    assert await fleet.store.expire_early_events(limit=10) == 1
    [(_, row)] = fleet.store.outbox()
    letter = from_outbox(TOPOLOGY, row, user_id="fleet")
    assert letter.exchange == TOPOLOGY.dead_letter_exchange
    assert letter.headers["x-dead-reason"] == "unknown-instance"
    assert "held" in letter.headers["x-dead-detail"]
    assert (letter.body, letter.message_id, letter.user_id) == (
        message.body,
        message.message_id,
        None,
    )
    assert await fleet.store.held_events(InstanceKey(TENANT, "ghost")) == []


async def test_an_early_event_past_its_tenants_share_is_dead_lettered_at_once():
    """Held events of a tenant store at most its share: the next event for an instance not
    created yet is dead-lettered `unknown-instance` at once, saying why, and is acked."""
    # Each event stores its payload twice (as payload, in its letter's body) and the
    # letter's headers: about 8.5 KB, so the share holds one.
    fleet = Fleet(early_event_seconds=60, early_event_tenant_bytes=12_000)
    first = await fleet.processor.process([fleet.event("o-1", "e-1", {"pad": "x" * 4000})])
    assert first.dead_letters == 0
    second = await fleet.processor.process([fleet.event("o-2", "e-2", {"pad": "y" * 4000})])
    assert second.dead_letters == 1
    [letter] = fleet.dead()
    assert letter.headers["x-dead-reason"] == "unknown-instance"
    assert "STEPFLEET_EARLY_EVENT_TENANT_BYTES" in letter.headers["x-dead-detail"]
    assert "share of 12000 bytes" in letter.headers["x-dead-detail"]
    assert len(fleet.acks.acked) == 2
    assert [h.event_id for h in await fleet.store.held_events(InstanceKey(TENANT, "o-1"))] == [
        "e-1"
    ]
    assert await fleet.store.held_events(InstanceKey(TENANT, "o-2")) == []


async def test_an_event_for_no_instance_is_dead_lettered():
    fleet = Fleet()
    result = await fleet.processor.process([fleet.event("ghost", "e-1", {})])
    assert result.dead_letters == 1
    assert fleet.dead()[0].headers["x-dead-reason"] == "unknown-instance"


async def test_an_early_event_is_stored_and_taken_by_the_wait():
    fleet = Fleet(guest=waits_for_go)
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    assert (await fleet.status("o-1")).record.waiting.kind is WaitKind.EVENT
    await fleet.processor.process([fleet.event("o-1", "e-1", {"ok": True})])
    again = await fleet.processor.process([fleet.event("o-1", "e-1", {"ok": True})])
    detail = await fleet.status("o-1")
    assert (detail.record.status, detail.record.output) == (
        InstanceStatus.COMPLETE,
        '{"ok":true}',
    )
    assert [e.kind for e in detail.journal] == [EntryKind.EVENT_RECEIVED]
    assert again.duplicates == 1


async def test_running_steps_quota_parks_what_has_no_slot():
    fleet = Fleet(limits=TenantLimits(running_steps=1))
    await fleet.push()
    result = await fleet.processor.process([fleet.create("o-1"), fleet.create("o-2")])
    assert result.steps == 1
    held = [
        d.record for d in [await fleet.status("o-1"), await fleet.status("o-2")] if not d.journal
    ]
    assert len(held) == 1
    assert held[0].status is InstanceStatus.QUEUED
    assert held[0].waiting is not None
    assert held[0].waiting.kind is WaitKind.THROTTLE
    assert held[0].waiting.wake_at > fleet.now


async def test_rate_quota_holds_steps_past_the_bucket():
    fleet = Fleet(limits=TenantLimits(steps_per_second=1))
    await fleet.push()
    result = await fleet.processor.process([fleet.create(f"o-{i}") for i in range(3)])
    assert result.steps < 3
    waits = []
    for i in range(3):
        record = (await fleet.status(f"o-{i}")).record
        if record.waiting is not None:
            waits.append(record.waiting.wake_at - fleet.now)
    assert waits
    assert all(timedelta(0) < w <= timedelta(seconds=3) for w in waits)


async def test_nothing_is_written_or_acked_when_the_store_fails():
    fleet = Fleet()
    await fleet.push()
    fleet.processor.confirmed_outbox = [1, 2]

    fleet.processor.cycle._store = FailingWrites(fleet.store)
    with pytest.raises(StoreUnavailable):
        await fleet.processor.process([fleet.create("o-1")])
    assert await fleet.store.detail(InstanceKey(TENANT, "o-1")) is None
    assert fleet.acks.acked == []
    assert fleet.processor.confirmed_outbox == [1, 2]


async def test_giving_up_on_a_step_errors_its_instance_and_on_a_create_dead_letters_it():
    fleet = Fleet()
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    [step] = fleet.steps()
    sent = delivery(fleet.acks, dict(step.headers), step.body, routing_key=step.routing_key)
    await fleet.processor.give_up(sent, RuntimeError("host bug\nsecond line"))
    record = (await fleet.status("o-1")).record
    assert record.status is InstanceStatus.ERRORED
    assert record.error == "stepfleet could not process its step: RuntimeError: host bug"
    create = fleet.create("o-2")
    await fleet.processor.give_up(create, ValueError("boom"))
    assert fleet.dead()[-1].headers["x-dead-reason"] == "unprocessable"
    assert sent in fleet.acks.acked
    assert create in fleet.acks.acked


async def test_every_log_line_of_a_delivery_carries_its_context():
    fleet = Fleet()
    await fleet.push()
    with capture_logs() as logs:
        await fleet.processor.process([fleet.create("o-1")])
    mine = [e for e in logs if e.get("instance") == "o-1"]
    assert {e["event"] for e in mine} >= {"guest_log", "step_recorded"}
    for event in mine:
        assert (event["tenant"], event["module_digest"]) == (TENANT, MODULE), event
    recorded = next(e for e in mine if e["event"] == "step_recorded")
    assert (recorded["step"], recorded["attempt"], recorded["position"]) == ("reserve", 1, 0)


def calls_once(entries: Sequence[JournalEntry], attempt: int, answers) -> GuestReport:
    """One step that makes one HTTP call and records its answer, then completes."""
    if entries:
        return GuestReport(Completed(1, entries[0].value))
    request = HttpRequest("GET", "http://api.test/")
    if not answers:
        return GuestReport(CallRequested(0, "get", request, (), deadline=float("inf")))
    return GuestReport(StepSucceeded(0, "get", json.dumps(answers[0].response.body)))


class OneAnswer:
    call_timeout_s = 5.0

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        self.calls += 1
        return HttpResponse(200, {}, f"answer-{self.calls}")


async def test_a_step_waiting_on_its_call_is_acked_only_once_its_step_is_written():
    gateway = OneAnswer()
    fleet = Fleet(sandbox=FunctionSandbox({}, calling={MODULE: calls_once}), caller=gateway)
    await fleet.push()
    create = fleet.create("o-1")
    result = await fleet.processor.process([create])
    assert (result.steps, fleet.acks.acked) == (0, [])
    assert fleet.processor.holds(create)
    assert await fleet.handed_back() == [create]  # the call's task hands the delivery back
    # A redelivered copy of the create comes first in the next batch: the resumed one is
    # deferred, and keeps its answer.
    copy = fleet.create("o-1")
    result = await fleet.processor.process([copy, create])
    assert result.deferred == [create]
    assert fleet.processor.holds(create)
    result = await fleet.processor.process([create])
    assert result.steps == 2  # the step, then the end chained to it
    assert gateway.calls == 1
    assert create in fleet.acks.acked
    assert not fleet.processor.holds(create)
    detail = await fleet.status("o-1")
    assert [e.value for e in detail.journal] == ['"answer-1"']


def plain_then_calls(entries: Sequence[JournalEntry], attempt: int, answers) -> GuestReport:
    """A step with no call, then a step that makes one, then the end."""
    if not entries:
        return GuestReport(StepSucceeded(0, "reserve", '"r"'))
    if len(entries) == 2:
        return GuestReport(Completed(2, entries[1].value))
    if not answers:
        request = HttpRequest("GET", "http://api.test/")
        return GuestReport(CallRequested(1, "charge", request, (), deadline=float("inf")))
    return GuestReport(StepSucceeded(1, "charge", json.dumps(answers[0].response.body)))


async def test_a_local_next_step_waits_for_its_call_without_a_transaction():
    gateway = OneAnswer()
    fleet = Fleet(
        sandbox=FunctionSandbox({}, calling={MODULE: plain_then_calls}),
        caller=gateway,
        local_steps=10,
        chain_steps=1,  # one step per write
    )
    await fleet.push()
    await fleet.processor.process([fleet.create("o-1")])
    [local] = fleet.inbox
    fleet.inbox.clear()
    opened: list[None] = []
    transaction = fleet.store.transaction

    def counted():
        opened.append(None)
        return transaction()

    fleet.store.transaction = counted  # type: ignore[method-assign]
    result = await fleet.processor.process([local])
    assert (result.steps, opened) == (0, [])  # it ran up to its call, reading nothing
    assert await fleet.handed_back() == [local]
    result = await fleet.processor.process([local])
    assert (result.steps, len(opened), gateway.calls) == (1, 1, 1)
    [end] = fleet.inbox
    await fleet.processor.process([end])
    detail = await fleet.status("o-1")
    assert detail.record.status is InstanceStatus.COMPLETE
    assert [e.value for e in detail.journal] == ['"r"', '"answer-1"']
    assert fleet.store.outbox() == []


class SlicedSandbox(FunctionSandbox):
    """Records each run's thread and fuel; a run of HEAVY given no more than the inline slice
    runs out of fuel, as a long guest would."""

    def __init__(self) -> None:
        super().__init__({MODULE: two_steps, HEAVY: two_steps})
        self.seen: list[tuple[str, int | None, str]] = []

    def run(self, job):
        self.seen.append((job.digest, job.fuel_per_run, threading.current_thread().name))
        if job.digest == HEAVY and job.fuel_per_run is not None and job.fuel_per_run <= SLICE_FUEL:
            return GuestReport(StepFailed(0, "reserve", "out of fuel", limit="cpu"))
        return super().run(job)


HEAVY = "sha256:" + "cd" * 32


class HeldLongRuns:
    """Long runs as guest processes take them, each on a thread of its own, held until
    `release` is set (a run that burns seconds of CPU)."""

    def __init__(self, sandbox: SlicedSandbox) -> None:
        self.sandbox = sandbox
        self.release = threading.Event()
        self.started = threading.Event()
        self.jobs: list = []

    def submit(self, job):
        future: Future[GuestReport] = Future()

        def run() -> None:
            self.started.set()
            self.release.wait(30)
            future.set_result(self.sandbox.run(job))

        self.jobs.append(job)
        threading.Thread(target=run, name="guest-process", daemon=True).start()
        return future

    def close(self) -> None:
        self.release.set()


async def test_a_long_run_goes_on_apart_while_another_tenants_short_run_completes():
    """A's run overran its slice and went to the guest processes: its batch goes on without
    it (nothing of it written, its delivery not acked), B's batch runs inline and is written,
    and A's delivery comes back, once its run is done, for a cycle that takes the run."""
    sandbox = SlicedSandbox()
    long_runs = HeldLongRuns(sandbox)
    fleet = Fleet(sandbox=sandbox, guest_processes=long_runs)
    await fleet.store.put_module(TENANT, HEAVY, b"\0asm")
    await fleet.store.put_module(OTHER, MODULE, b"\0asm")
    heavy = fleet.message("create", "h-1", {"version": 1, "params": {}}, **{"x-module": HEAVY})
    light = fleet.message("create", "b-1", {"version": 1, "params": {}}, **{"x-tenant": OTHER})
    try:
        assert (await fleet.processor.process([heavy])).steps == 0
        assert fleet.processor.holds(heavy)
        assert (await fleet.processor.process([light])).steps == 1
        assert fleet.acks.acked == [light]
        assert await journal(fleet, TENANT, "h-1") == []  # A's run is still going on
        assert await journal(fleet, OTHER, "b-1") == ["reserve"]
        long_runs.release.set()
        [again] = await fleet.handed_back()
    finally:
        long_runs.close()
    assert again is heavy
    assert (await fleet.processor.process([again])).steps == 1
    assert await journal(fleet, TENANT, "h-1") == ["reserve"]
    assert fleet.acks.acked == [light, heavy]
    # The run made apart was taken, not made again.
    assert [(job.tenant, job.digest, job.fuel_per_run) for job in long_runs.jobs] == [
        (TENANT, HEAVY, None)
    ]


async def test_a_local_next_step_that_goes_long_is_set_apart_before_any_transaction():
    sandbox = SlicedSandbox()
    long_runs = HeldLongRuns(sandbox)
    long_runs.release.set()
    fleet = Fleet(sandbox=sandbox, guest_processes=long_runs, local_steps=10)
    await fleet.store.put_module(TENANT, HEAVY, b"\0asm")
    heavy = fleet.message("create", "h-1", {"version": 1, "params": {}}, **{"x-module": HEAVY})
    try:
        assert (await fleet.processor.process([heavy])).steps == 0
        # Back come: the create, the local step 2, step 2 once run, step 3, step 3 once run.
        for _ in range(5):
            [delivery] = await fleet.handed_back()
            await fleet.processor.process([delivery])
    finally:
        long_runs.close()
    detail = await fleet.store.detail(InstanceKey(TENANT, "h-1"))
    assert detail is not None
    assert detail.record.status is InstanceStatus.COMPLETE
    assert [e.name for e in detail.journal] == ["reserve", "charge"]
    # One long run per step, each taken by the cycle its delivery came back to.
    assert len(long_runs.jobs) == 3
    assert fleet.store.outbox() == []
    assert fleet.published == []


async def journal(fleet: Fleet, tenant: str, instance: str) -> list[str]:
    detail = await fleet.store.detail(InstanceKey(tenant, instance))
    assert detail is not None
    return [e.name for e in detail.journal]


async def test_short_runs_stay_on_the_loop_thread_and_long_ones_run_again_on_the_guest_thread():
    sandbox = SlicedSandbox()
    with ThreadPoolExecutor(1, thread_name_prefix="guest") as thread:
        fleet = Fleet(sandbox=sandbox, wasm_thread=thread)
        await fleet.push()
        await fleet.store.put_module(TENANT, HEAVY, b"\0asm")
        heavy = fleet.message("create", "h-1", {"version": 1, "params": {}}, **{"x-module": HEAVY})
        result = await fleet.processor.process([fleet.create("o-1"), heavy])
        assert result.steps == 2
        loop_thread = threading.current_thread().name
        assert sandbox.seen == [
            (MODULE, SLICE_FUEL, loop_thread),
            (HEAVY, SLICE_FUEL, loop_thread),  # abandoned when its slice ran out
            (HEAVY, None, "guest_0"),  # again, with its whole budget
        ]
        # The slice's failure was not recorded: the run on the guest thread's step was.
        assert [e.name for e in (await fleet.status("h-1")).journal] == ["reserve"]
        sandbox.seen.clear()
        await fleet.forward()
        # The module that overran now goes straight to the guest thread.
        assert sorted(sandbox.seen) == [
            (MODULE, SLICE_FUEL, loop_thread),
            (HEAVY, None, "guest_0"),
        ]


async def test_a_create_whose_first_run_goes_long_is_set_apart_by_its_transaction():
    """A create the guarded write could take, but whose module overran its slice: nothing runs
    it before the transaction, which sets its run apart and writes its row, as for any create."""
    sandbox = SlicedSandbox()
    long_runs = HeldLongRuns(sandbox)
    long_runs.release.set()
    fleet = Fleet(sandbox=sandbox, guest_processes=long_runs)
    await fleet.store.put_module(TENANT, HEAVY, b"\0asm")
    first, second = (
        fleet.message("create", name, {"version": 1, "params": {}}, **{"x-module": HEAVY})
        for name in ("h-1", "h-2")
    )
    try:
        assert (await fleet.processor.process([first])).steps == 0
        [back] = await fleet.handed_back()
        assert (await fleet.processor.process([back])).steps == 1  # known and loaded now
        sandbox.seen.clear()
        assert (await fleet.processor.process([second])).steps == 0
        assert fleet.processor.holds(second)
        assert await journal(fleet, TENANT, "h-2") == []  # its row, while its run goes on
        # No slice was tried for it: the module overran, so the one run is the long one.
        assert [fuel for _, fuel, _ in sandbox.seen] in ([], [None])
        [back] = await fleet.handed_back()
        assert (await fleet.processor.process([back])).steps == 1
    finally:
        long_runs.close()
    assert await journal(fleet, TENANT, "h-2") == ["reserve"]
    assert len(long_runs.jobs) == 2


async def test_a_batchs_inline_runs_let_the_loop_turn_between_turns_of_runs():
    """Six creates whose runs take a turn's time each: the loop runs other tasks between them,
    where the batch once held it for all six (its whole inline budget)."""
    order: list[str] = []

    class TurnLongSandbox(SlicedSandbox):
        def run(self, job):
            end = time.perf_counter() + TURN_SECONDS
            while time.perf_counter() < end:
                pass
            order.append("run")
            return super().run(job)

    sandbox = TurnLongSandbox()
    long_runs = HeldLongRuns(sandbox)
    long_runs.release.set()
    fleet = Fleet(sandbox=sandbox, guest_processes=long_runs)
    await fleet.push()
    done = False

    async def ticking() -> None:
        while not done:
            order.append("tick")
            await asyncio.sleep(0)

    ticker = asyncio.create_task(ticking())
    await asyncio.sleep(0)
    try:
        result = await fleet.processor.process([fleet.create(f"o-{i}") for i in range(6)])
    finally:
        done = True
        await ticker
        long_runs.close()
    assert result.steps >= 6
    runs = [i for i, what in enumerate(order) if what == "run"]
    assert "tick" in order[runs[0] : runs[5]], order
