"""Steps that wait on HTTP calls: a run stops at each call, nothing is written while the call
is in flight, and the attempt runs again with every answer so far. The real step cycle over
the in-memory store, the real sandbox with the playbook example, and a fake gateway."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import structlog

from stepfleet.broker import Topology
from stepfleet.cycle.calls import CallScheduler
from stepfleet.cycle.step import StepCycle
from stepfleet.cycle.work import Suspended, Work
from stepfleet.sandbox import GuestRun, ReplayJournal, WasmSandbox, encode_replay_buffer
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.schemas import (
    SCHEMA_VERSION,
    AnsweredCall,
    CallRequested,
    CreateBody,
    EntryKind,
    Envelope,
    HttpRequest,
    HttpResponse,
    InstanceKey,
    InstanceStatus,
    MessageKind,
    StepSucceeded,
    digest_of,
    parse_envelope,
)
from stepfleet.store import MemoryStore, StepWrite
from tests.conftest import capture_logs

TENANT = "acme"
URL = "http://api.test/v1"


class FakeGateway:
    """Answers each call with its number; counts the calls in flight at once."""

    call_timeout_s = 5.0

    def __init__(self, *, hold: float = 0.0) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.in_flight = 0
        self.peak = 0
        self.hold = hold
        self.release = asyncio.Event()

    async def call(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        self.calls.append((tenant, request.method, request.url))
        number = len(self.calls)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hold:
                try:
                    await asyncio.wait_for(self.release.wait(), min(self.hold, timeout_s))
                except TimeoutError:
                    return HttpResponse.failed(f"timed out after {timeout_s:.3g} s")
            return HttpResponse(200, {"content-type": "text/plain"}, f"answer-{number}")
        finally:
            self.in_flight -= 1


class Fleet:
    """One cycle over a MemoryStore; runs a workflow to its end, answering calls between."""

    def __init__(
        self, wasm: bytes, gateway: FakeGateway | None, chain_steps: int = 16, **limits: Any
    ) -> None:
        self.store = MemoryStore()
        self.sandbox = WasmSandbox(SandboxLimits(**limits))
        self.digest = digest_of(wasm)
        self.sandbox.load(self.digest, wasm)
        self.wasm = wasm
        self.cycle = StepCycle(
            store=self.store, sandbox=self.sandbox, topology=Topology("t"), chain_steps=chain_steps
        )
        self.calls = CallScheduler(gateway, max_in_flight=100, tenant_cap=lambda _: 100)
        self.suspensions = 0

    def create(self, instance: str, *ops: dict[str, Any]) -> Work[None]:
        body = CreateBody(version=SCHEMA_VERSION, params={"ops": list(ops)})
        return Work(None, Envelope(MessageKind.CREATE, TENANT, instance, self.digest, body))

    async def run(self, work: Work[None], *, local: bool = False) -> None:
        """Take the workflow to its end: resume after each call, follow each next step
        (`local`: as the worker that wrote it takes it on, not through the broker)."""
        await self.store.put_module(TENANT, self.digest, self.wasm)
        queue = [work]
        while queue:
            result = await self.cycle.run([queue.pop(0)])
            for suspended in result.suspended:
                self.suspensions += 1
                queue.append(await self.calls.answer(suspended))
            for step in result.next_steps:
                if local:
                    taken: Work[None] = Work(None, step.envelope)
                    taken.intent, taken.expected = step.outbox_id, step.state
                    queue.append(taken)
                    continue
                message = step.message
                envelope = parse_envelope(message.headers, message.body, max_body_bytes=1 << 20)
                queue.append(Work(None, envelope))

    async def journal(self, instance: str) -> list[tuple[int, EntryKind, str, str]]:
        detail = await self.store.detail(InstanceKey(TENANT, instance))
        assert detail is not None
        return [(e.seq, e.kind, e.name, e.value) for e in detail.journal]


@pytest.fixture
def fleet_of(playbook_wasm):
    made: list[Fleet] = []

    def make(gateway: FakeGateway | None, chain_steps: int = 16, **limits: Any) -> Fleet:
        made.append(Fleet(playbook_wasm, gateway, chain_steps, **limits))
        return made[-1]

    yield make
    for fleet in made:
        fleet.sandbox.close()


def answer(number: int) -> str:
    return json.dumps({"status": 200, "body": f"answer-{number}"}, separators=(",", ":"))


@pytest.mark.parametrize("local", [False, True])
async def test_a_next_step_run_here_waits_for_its_call_without_a_transaction(fleet_of, local):
    gateway = FakeGateway()
    fleet = fleet_of(gateway, chain_steps=1)  # one step per write
    (transactions, guarded), runs = count_writes(fleet.store), count_runs(fleet.sandbox)
    work = fleet.create(
        "i-1",
        {"op": "http", "name": "first", "url": URL + "/a"},
        {"op": "do", "name": "middle"},
        {"op": "http", "name": "last", "url": URL + "/b"},
    )
    await fleet.run(work, local=local)
    assert await fleet.journal("i-1") == [
        (0, EntryKind.STEP_SUCCEEDED, "first", answer(1)),
        (1, EntryKind.STEP_SUCCEEDED, "middle", '{"step":"middle","attempt":1}'),
        (2, EntryKind.STEP_SUCCEEDED, "last", answer(2)),
    ]
    # A create and three steps, two of them stopping at a call once: six runs either way.
    # The create's transaction writes its row while its call is made; the resumed "first"
    # runs before any transaction, on the new instance, and one guarded write writes it.
    # Taken on locally, the run of "last" that stops at its call opens no transaction, and
    # "middle", the resumed "last" and the end, run before any transaction on the instance
    # as the worker left it, are each written by one guarded write instead of a transaction.
    assert (len(transactions), len(guarded), len(runs)) == ((1, 4, 6) if local else (5, 1, 6))
    if local:
        assert fleet.store.outbox() == []  # each step's row went with the write that ran it


async def test_a_resumed_attempt_that_asks_for_another_call_is_admitted_first(fleet_of):
    gateway = FakeGateway()
    fleet = fleet_of(gateway)
    await fleet.store.put_module(TENANT, fleet.digest, fleet.wasm)
    twice = {"op": "http", "name": "twice", "url": URL + "/a", "repeat": 2}
    result = await fleet.cycle.run([fleet.create("i-1", {"op": "do", "name": "first"}, twice)])
    [step] = result.next_steps
    taken: Work[None] = Work(None, step.envelope)
    taken.intent, taken.expected = step.outbox_id, step.state  # as the worker takes it on
    [suspended] = (await fleet.cycle.run([taken])).suspended
    resumed = await fleet.calls.answer(suspended)
    key = InstanceKey(TENANT, "i-1")
    async with fleet.store.transaction() as tx:  # an operator's pause while the call ran
        row = (await tx.lock_instances([key]))[key]
        paused = StepWrite(
            key,
            InstanceStatus.PAUSED,
            row.position,
            attempt=row.attempt,
            state_bytes=row.state_bytes,
        )
        await tx.write_batch([paused], [])
    result = await fleet.cycle.run([resumed])
    assert (result.suspended, result.duplicates) == ([], [resumed])
    assert len(gateway.calls) == 1  # the second call never went out
    assert await fleet.journal("i-1") == [
        (0, EntryKind.STEP_SUCCEEDED, "first", '{"step":"first","attempt":1}')
    ]


def count_writes(store: MemoryStore) -> tuple[list[None], list[None]]:
    """Count the transactions a cycle opens and its guarded writes (MemoryStore makes each
    guarded write in a transaction of its own, not counted as one)."""
    opened: list[None] = []
    guarded: list[None] = []
    transaction, write_unchanged = store.transaction, store.write_unchanged
    within = False

    def counted():
        if not within:
            opened.append(None)
        return transaction()

    async def counted_write(writes, **kwargs):
        nonlocal within
        guarded.append(None)
        within = True
        try:
            return await write_unchanged(writes, **kwargs)
        finally:
            within = False

    store.transaction = counted  # type: ignore[method-assign]
    store.write_unchanged = counted_write  # type: ignore[method-assign]
    return opened, guarded


def count_runs(sandbox: WasmSandbox) -> list[str]:
    runs: list[str] = []
    run = sandbox.run

    def counted(job):
        runs.append(job.digest)
        return run(job)

    sandbox.run = counted  # type: ignore[method-assign]
    return runs


async def test_each_call_suspends_the_step_and_the_journal_records_every_answer(fleet_of):
    gateway = FakeGateway()
    fleet = fleet_of(gateway)
    work = fleet.create(
        "i-1",
        {"op": "http", "name": "first", "url": URL + "/a"},
        {"op": "do", "name": "middle"},
        {"op": "http", "name": "last", "url": URL + "/b", "repeat": 3},
    )
    await fleet.run(work)
    # The golden journal: each http step records the last of its answers, in call order.
    assert await fleet.journal("i-1") == [
        (0, EntryKind.STEP_SUCCEEDED, "first", answer(1)),
        (1, EntryKind.STEP_SUCCEEDED, "middle", '{"step":"middle","attempt":1}'),
        (2, EntryKind.STEP_SUCCEEDED, "last", answer(4)),
    ]
    assert gateway.calls == [(TENANT, "GET", URL + "/a")] + [(TENANT, "GET", URL + "/b")] * 3
    assert fleet.suspensions == 4  # one per call: none is made twice
    detail = await fleet.store.detail(InstanceKey(TENANT, "i-1"))
    assert detail is not None
    assert detail.record.status is InstanceStatus.COMPLETE


async def test_nothing_of_the_step_is_written_while_its_call_is_in_flight(fleet_of):
    fleet = fleet_of(FakeGateway())
    await fleet.store.put_module(TENANT, fleet.digest, fleet.wasm)
    key = InstanceKey(TENANT, "i-2")
    result = await fleet.cycle.run([fleet.create("i-2", {"op": "http", "name": "get", "url": URL})])
    [suspended] = result.suspended
    assert (result.ran, result.messages, result.outbox_ids) == ([], [], [])
    assert suspended.call.request.url == URL
    # The create's row exists (so `status` shows it), with no journal, and the message of its
    # first step waits in the outbox in case this worker dies: it is not published now.
    detail = await fleet.store.detail(key)
    assert detail is not None
    assert (detail.record.status, detail.journal) == (InstanceStatus.RUNNING, [])
    [(intent_id, intent)] = fleet.store.outbox()
    assert json.loads(intent.body)["position"] == 0
    resumed = await fleet.calls.answer(suspended)
    [made] = resumed.answers
    assert made.request.url == URL
    assert made.response == HttpResponse(200, {"content-type": "text/plain"}, "answer-1")
    result = await fleet.cycle.run([resumed])
    # The step, then the end chained to it (cycle/chain.py).
    assert [i.decision.position for i in result.ran if i.decision] == [1, 1]
    assert await fleet.journal("i-2") == [(0, EntryKind.STEP_SUCCEEDED, "get", answer(1))]
    # The finishing write deleted the first step's message; the next step's is there.
    assert [i for i, _ in fleet.store.outbox()] == result.outbox_ids
    assert intent_id not in result.outbox_ids


async def test_a_create_whose_worker_died_during_its_call_carries_on(fleet_of):
    """The worker dies with the call in flight: the create comes again (a duplicate now), and
    the first step's message, published by the outbox relay, runs the step and its call again."""
    gateway = FakeGateway()
    fleet = fleet_of(gateway)
    await fleet.store.put_module(TENANT, fleet.digest, fleet.wasm)
    create = fleet.create("i-7", {"op": "http", "name": "get", "url": URL})
    assert (await fleet.cycle.run([create])).suspended  # and then the worker is gone
    again = await fleet.cycle.run([fleet.create("i-7", {"op": "http", "name": "get", "url": URL})])
    assert len(again.duplicates) == 1
    [(_, intent)] = fleet.store.outbox()
    relayed = parse_envelope(json.loads(intent.headers), intent.body, max_body_bytes=1 << 20)
    await fleet.run(Work(None, relayed))
    assert await fleet.journal("i-7") == [(0, EntryKind.STEP_SUCCEEDED, "get", answer(1))]
    assert len(gateway.calls) == 1  # the dead worker never made its call


async def test_calls_over_the_step_cap_are_answered_without_a_call(fleet_of):
    gateway = FakeGateway()
    fleet = fleet_of(gateway, host_calls_per_step=2)
    await fleet.run(fleet.create("i-3", {"op": "http", "name": "many", "url": URL, "repeat": 3}))
    [(_, _, _, value)] = await fleet.journal("i-3")
    assert "a step may make 2 HTTP call(s)" in json.loads(value)["error"]
    assert len(gateway.calls) == 2


async def test_the_step_timeout_still_ends_an_attempt_whose_call_hangs(fleet_of):
    gateway = FakeGateway(hold=30.0)
    fleet = fleet_of(gateway)
    await fleet.run(
        fleet.create("i-4", {"op": "http", "name": "hang", "url": URL, "timeout_ms": 50})
    )
    detail = await fleet.store.detail(InstanceKey(TENANT, "i-4"))
    assert detail is not None
    [failed] = detail.attempts  # then parked for its retry
    assert (failed.name, failed.error) == ("hang", "step 'hang' timed out after 50 ms")
    assert detail.journal == []


async def test_a_tenant_never_has_more_calls_in_flight_than_its_cap():
    gateway = FakeGateway(hold=30.0)
    scheduler = CallScheduler(gateway, max_in_flight=100, tenant_cap=lambda _: 2)
    request = HttpRequest("GET", URL)
    body = CreateBody(version=SCHEMA_VERSION)
    waiting = [
        Suspended(
            Work(None, Envelope(MessageKind.CREATE, TENANT, f"i-{n}", "d", body)),
            CallRequested(0, "get", request, (), deadline=float("inf")),
        )
        for n in range(5)
    ]
    tasks = [asyncio.create_task(scheduler.answer(s)) for s in waiting]
    for _ in range(50):  # let every task that could start a call do so
        await asyncio.sleep(0)
    assert (gateway.in_flight, scheduler.in_flight) == (2, 2)
    gateway.release.set()
    answered = await asyncio.gather(*tasks)
    assert gateway.peak == 2
    assert len(gateway.calls) == 5
    assert all(len(w.answers) == 1 for w in answered)


async def test_without_a_gateway_calls_are_refused_and_the_workflow_goes_on(fleet_of):
    fleet = fleet_of(None)
    await fleet.run(fleet.create("i-5", {"op": "http", "name": "get", "url": URL}))
    [(_, _, _, value)] = await fleet.journal("i-5")
    assert json.loads(value) == {"error": "egress is not configured"}


def test_a_resumed_step_that_asks_another_request_has_it_made(fleet_of):
    """Answers are matched to calls by index and request: a step that builds its request
    differently on the next run (a random key, the time) gets a new call, not a stale answer."""
    fleet = fleet_of(None)
    params = json.dumps({"ops": [{"op": "http", "name": "get", "url": URL}]})
    buffer = encode_replay_buffer("i-6", params, ReplayJournal())
    stale = AnsweredCall(HttpRequest("GET", URL + "/other"), HttpResponse(200, {}, "stale"))
    report = fleet.sandbox.run(GuestRun(fleet.digest, buffer, answers=(stale,)))
    assert isinstance(report.outcome, CallRequested)
    assert (report.outcome.request.url, report.outcome.answered) == (URL, ())
    same = AnsweredCall(HttpRequest("GET", URL), HttpResponse(200, {}, "fresh"))
    report = fleet.sandbox.run(GuestRun(fleet.digest, buffer, answers=(same,)))
    assert isinstance(report.outcome, StepSucceeded)
    assert json.loads(report.outcome.result) == {"status": 200, "body": "fresh"}


async def test_the_gateway_logs_a_call_with_the_step_context():
    """What the gateway logs while it makes a step's call names the tenant, instance and step."""

    class Logging(FakeGateway):
        async def call(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
            structlog.get_logger("stepfleet.egress").info("egress_call", tenant=tenant)
            return await super().call(tenant, request, timeout_s)

    scheduler = CallScheduler(Logging(), max_in_flight=1, tenant_cap=lambda _: 1)
    body = CreateBody(version=SCHEMA_VERSION)
    work = Work(None, Envelope(MessageKind.CREATE, TENANT, "i-8", "sha256:" + "d" * 64, body))
    call = CallRequested(2, "charge", HttpRequest("GET", URL), (), deadline=float("inf"))
    with capture_logs() as logs:
        await scheduler.answer(Suspended(work, call))
    [line] = [e for e in logs if e["event"] == "egress_call"]
    assert (line["instance"], line["step"], line["position"]) == ("i-8", "charge", 2)
    assert line["module_digest"] == "sha256:" + "d" * 64
