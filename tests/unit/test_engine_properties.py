"""Property-based tests of the step cycle in an in-memory fleet: no RabbitMQ, PostgreSQL or wasm.

`Fleet` drives the fleet's own step cycle (cycle/step.py) over the in-memory store, with a
`Program` standing in for the guest, and keeps what the broker and the timer loop keep: the
pending messages and the timer. Hypothesis draws a program and an interleaving of deliveries, redeliveries
(a crash after commit, before the ack), rolled-back transactions, timer firings and event
sends; then the broker is drained and the properties are checked.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from hypothesis import given, settings
from hypothesis import strategies as st

from stepfleet.broker import Topology
from stepfleet.cycle.step import StepCycle
from stepfleet.cycle.work import Ran, Work, state_of
from stepfleet.engine import EngineLimits, InstanceState, due_us
from stepfleet.schemas import (
    Backoff,
    Completed,
    CreateBody,
    EntryKind,
    Envelope,
    EventAwaited,
    EventBody,
    FailedAttempt,
    GuestOutcome,
    GuestReport,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    MessageKind,
    Nondeterministic,
    SleepRequested,
    StepBody,
    StepConfig,
    StepFailed,
    StepSucceeded,
    WaitKind,
    WakeBody,
    WorkflowFailed,
    parse_envelope,
)
from stepfleet.store import MemoryStore, StepTx, StoreUnavailable
from stepfleet.store.errors import IntegrityViolation
from stepfleet.store.memory_tx import Event
from tests.fakes import FunctionSandbox

KEY = InstanceKey("acme", "order-1")
MODULE = "sha256:" + "ab" * 32
PARAMS = {"order": 1}
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = EngineLimits()
TOPOLOGY = Topology("props")
EVENT_TIMEOUT_MS = 3_600_000
TIMED = frozenset(
    {InstanceStatus.QUEUED, InstanceStatus.RUNNING, InstanceStatus.SLEEPING, InstanceStatus.WAITING}
)
"""Statuses whose parked instances the timer loop wakes (store/pg.py `_DUE_TIMERS`)."""

FLEET_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


# -- the guest ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A step that fails its first `failures` attempts and is retried as `config` says."""

    name: str
    failures: int
    config: StepConfig

    @property
    def kinds(self) -> frozenset[EntryKind]:
        return frozenset({EntryKind.STEP_SUCCEEDED, EntryKind.STEP_FAILED})

    @property
    def gives_up(self) -> bool:
        """The program's verdict: the step fails more often than it is retried."""
        return self.failures > self.config.retry_limit

    def begin(self, seq: int, attempt: int) -> GuestOutcome:
        if attempt <= self.failures:
            return StepFailed(seq, self.name, f"attempt {attempt} failed", config=self.config)
        return StepSucceeded(seq, self.name, json.dumps(self.name), config=self.config)


@dataclass(frozen=True)
class Sleep:
    """A durable sleep of `ms` milliseconds (0 goes on at once)."""

    name: str
    ms: int = 1000

    @property
    def kinds(self) -> frozenset[EntryKind]:
        return frozenset({EntryKind.SLEPT})

    def begin(self, seq: int, attempt: int) -> GuestOutcome:
        return SleepRequested(seq, self.name, self.ms)


@dataclass(frozen=True)
class Wait:
    """A wait for an event of `event_type`; its event is sent as `event_id` with `payload`."""

    name: str
    event_type: str = "go"

    @property
    def kinds(self) -> frozenset[EntryKind]:
        return frozenset({EntryKind.EVENT_RECEIVED, EntryKind.EVENT_TIMED_OUT})

    @property
    def event_id(self) -> str:
        return f"evt-{self.name}"

    @property
    def payload(self) -> dict[str, str]:
        return {"for": self.name}

    def begin(self, seq: int, attempt: int) -> GuestOutcome:
        return EventAwaited(seq, self.name, self.event_type, EVENT_TIMEOUT_MS)


Op = Step | Sleep | Wait
Shape = tuple[int, str, int, str]
"""An entry as (seq, name, attempt, outcome), without times or values."""


@dataclass(frozen=True)
class Program:
    """The fake guest: one journal position per op; replays what is recorded, then begins
    the first op that is not (one new thing per run), or completes."""

    ops: tuple[Op, ...]

    @property
    def waits(self) -> tuple[Wait, ...]:
        return tuple(op for op in self.ops if isinstance(op, Wait))

    def run(self, entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
        for seq, op in enumerate(self.ops):
            if seq == len(entries):
                return GuestReport(op.begin(seq, attempt))
            entry = entries[seq]
            if entry.name != op.name or entry.kind not in op.kinds:
                return GuestReport(Nondeterministic(seq, op.name))
            if entry.kind is EntryKind.STEP_FAILED:
                return GuestReport(WorkflowFailed(len(entries), f"{op.name} gave up"))
        return GuestReport(Completed(len(entries), json.dumps(len(self.ops))))

    def expected(self) -> tuple[InstanceStatus, list[Shape], list[tuple[int, str, int]]]:
        """What the program says a run records: its final status, the journal as
        `shape`s and the failed attempts as (seq, name, attempt)."""
        journal: list[Shape] = []
        attempts: list[tuple[int, str, int]] = []
        for seq, op in enumerate(self.ops):
            if not isinstance(op, Step):
                journal.append((seq, op.name, 1, "slept" if isinstance(op, Sleep) else "event"))
                continue
            retried = min(op.failures, op.config.retry_limit)
            attempts += [(seq, op.name, attempt) for attempt in range(1, retried + 1)]
            journal.append((seq, op.name, retried + 1, "gave up" if op.gives_up else "done"))
            if op.gives_up:
                return InstanceStatus.ERRORED, journal, attempts
        return InstanceStatus.COMPLETE, journal, attempts


def shape(entry: JournalEntry) -> Shape:
    """An entry without its times and values (a wait's entry is an event either way)."""
    word = {
        EntryKind.STEP_SUCCEEDED: "done",
        EntryKind.STEP_FAILED: "gave up",
        EntryKind.SLEPT: "slept",
    }.get(entry.kind, "event")
    return entry.seq, entry.name, entry.attempt, word


# -- the fleet ---------------------------------------------------------------------------


def envelope(kind: MessageKind, body: CreateBody | StepBody | WakeBody | EventBody) -> Envelope:
    module = None if kind is MessageKind.EVENT else MODULE
    return Envelope(kind, KEY.tenant, KEY.instance_id, module, body)


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered message; `repeat` when it is an event whose id is already stored."""

    envelope: Envelope
    reason: str
    repeat: bool


Fate = Literal["ack", "redeliver", "crash"]

_LOOP = asyncio.Runner()


def teardown_module() -> None:
    _LOOP.close()


class CrashingStore:
    """The in-memory store, but a transaction can be made to fail at its write, as a crash
    before commit would: everything it did is rolled back."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.crash_next = False

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StepTx]:
        crash, self.crash_next = self.crash_next, False
        async with self.store.transaction() as tx:
            yield _CrashAtWrite(tx) if crash else tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class _CrashAtWrite:
    def __init__(self, tx: StepTx) -> None:
        self._tx = tx

    async def write_batch(self, *args: Any, **kwargs: Any) -> list[int]:
        raise StoreUnavailable("crashed before commit")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)


@dataclass
class Fleet:
    """The real step cycle over the in-memory store, with `Program` as the guest, plus the
    broker's pending messages and the timer loop. `timeouts` lets the timer end event waits
    (otherwise only events do)."""

    program: Program
    timeouts: bool = False
    broker: list[Envelope] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    """Writes the store refused (a second entry for a position) and gaps in the journal."""
    early: list[str] = field(default_factory=list)
    """Runs of a parked instance before its timer was due or its event came."""
    runs: list[tuple[int, int]] = field(default_factory=list)
    """(position, attempt) of every committed run that executed a step."""
    timed_out_waits: set[int] = field(default_factory=set)
    """Positions of event waits whose own timer fired."""
    sent: set[str] = field(default_factory=set)
    clock: datetime = T0

    def __post_init__(self) -> None:
        self.store = MemoryStore(clock=lambda: self.clock)
        self.crashing = CrashingStore(self.store)
        self.cycle = StepCycle(
            store=self.crashing,
            sandbox=FunctionSandbox({MODULE: self.program.run}),
            topology=TOPOLOGY,
            limits=LIMITS,
            clock=lambda: self.clock,
        )
        _LOOP.run(self.store.put_module(KEY.tenant, MODULE, b"\0asm"))
        self.broker.append(envelope(MessageKind.CREATE, CreateBody(params=PARAMS)))

    # -- what the store holds --------------------------------------------------------------

    @property
    def state(self) -> InstanceState | None:
        row = self.store.tables.instances.get(KEY)
        return None if row is None else state_of(row.record)

    @property
    def journal(self) -> list[JournalEntry]:
        return [e for _, e in sorted(self.store.tables.journal.get(KEY, {}).items())]

    @property
    def attempts(self) -> list[FailedAttempt]:
        return list(self.store.tables.attempts.get(KEY, {}).values())

    @property
    def events(self) -> dict[str, Event]:
        return self.store.tables.events.get(KEY, {})

    # -- what happens to the fleet ---------------------------------------------------------

    def deliver(self, index: int = 0, fate: Fate = "ack") -> None:
        """Deliver a pending message; a crash rolls back (it stays), a redelivery commits
        but loses the ack (it comes again)."""
        message = self.broker.pop(index)
        if fate != "ack":
            self.broker.append(message)
        self.clock += timedelta(milliseconds=1)
        self.crashing.crash_next = fate == "crash"
        try:
            _LOOP.run(self._handle(message))
        except StoreUnavailable:
            assert fate == "crash"

    def timer_due(self) -> bool:
        state = self.state
        return (
            state is not None
            and state.waiting is not None
            and state.status in TIMED
            and (self.timeouts or state.waiting.kind is not WaitKind.EVENT)
        )

    def fire_timer(self, copies: int = 1) -> None:
        """The timer loop publishes a wake for the row as it is now (again if unprocessed)."""
        state = self.state
        assert state is not None
        assert state.waiting is not None
        self.clock = max(self.clock, state.waiting.wake_at)
        if state.waiting.kind is WaitKind.EVENT:
            self.timed_out_waits.add(state.position)
        body = WakeBody(
            position=state.position,
            attempt=state.attempt,
            generation=state.generation,
            due_us=due_us(state.waiting.wake_at),
        )
        self.broker += [envelope(MessageKind.WAKE, body)] * copies

    def send_event(self, wait: Wait, copies: int = 1) -> None:
        """A producer publishes the wait's event (twice: it was unsure the first one went)."""
        body = EventBody(event_id=wait.event_id, type=wait.event_type, payload=wait.payload)
        self.broker += [envelope(MessageKind.EVENT, body)] * copies
        self.sent.add(wait.event_id)

    def drain(self, limit: int = 1000) -> None:
        """Send the events not sent yet, then deliver everything and fire every timer."""
        for wait in self.program.waits:
            if wait.event_id not in self.sent:
                self.send_event(wait)
        for _ in range(limit):
            if self.broker:
                self.deliver()
            elif self.timer_due():
                self.fire_timer()
            else:
                return
        raise AssertionError(f"the fleet did not settle in {limit} moves")

    # -- the worker: the real cycle ---------------------------------------------------------

    async def _handle(self, message: Envelope) -> None:
        body = message.body
        repeat = isinstance(body, EventBody) and body.event_id in self.events
        try:
            result = await self.cycle.run([Work(None, message)])
        except IntegrityViolation as exc:
            self.violations.append(str(exc))
            return
        for rejected in result.rejected:
            self.dead.append(DeadLetter(message, rejected.reason, repeat))
        for item in result.ran:
            self._check_on_time(message, item)
            outcome = item.report.outcome
            if isinstance(outcome, StepSucceeded | StepFailed):
                assert item.work.state is not None
                self.runs.append((outcome.seq, item.work.state.attempt))
        for sent in result.messages:
            self.broker.append(parse_envelope(sent.headers, sent.body, max_body_bytes=1 << 20))
        await self.store.delete_outbox(result.outbox_ids)
        state = self.state
        if state is not None and [e.seq for e in self.journal] != list(range(state.position)):
            self.violations.append(f"position {state.position}, journal {len(self.journal)}")

    def _check_on_time(self, message: Envelope, item: Ran[None]) -> None:
        """A parked instance runs only for its event, or for a wake once its timer is due."""
        record = item.work.record
        parked = None if record is None else record.waiting
        if parked is None:
            return
        if not (isinstance(message.body, EventBody) or self.clock >= parked.wake_at):
            self.early.append(f"{message.kind} {message.body} ran the instance parked as {parked}")


# -- what hypothesis draws -----------------------------------------------------------------


@st.composite
def programs(draw: st.DrawFn, *, max_ops: int = 5) -> Program:
    """Up to `max_ops` steps (some failing a few attempts), sleeps and event waits.

    A wait may directly follow a sleep that parks: a stale wake of the sleep must not time
    the wait out (see `test_a_stale_sleep_wake_does_not_time_out_the_next_wait`).
    """
    kinds = draw(st.lists(st.sampled_from(["step", "sleep", "wait"]), min_size=1, max_size=max_ops))
    ops: list[Op] = []
    for i, kind in enumerate(kinds):
        if kind == "step":
            config = StepConfig(
                retry_limit=draw(st.integers(0, 2)),
                retry_delay_ms=draw(st.sampled_from([0, 500])),
                backoff=draw(st.sampled_from(Backoff)),
            )
            failures = draw(st.integers(0, config.retry_limit + 1))
            ops.append(Step(f"step-{i}", failures, config))
        elif kind == "sleep":
            ops.append(Sleep(f"nap-{i}", draw(st.sampled_from([1000, 0]))))
        else:
            ops.append(Wait(f"wait-{i}", draw(st.sampled_from(["go", "ship"]))))
    return Program(tuple(ops))


FATES: tuple[Fate, ...] = ("ack", "redeliver", "crash")


def simulate(program: Program, data: st.DataObject, *, timeouts: bool = False) -> Fleet:
    """Run the program through a drawn interleaving of faults, then drain the fleet."""
    fleet = Fleet(program, timeouts=timeouts)
    for _ in range(data.draw(st.integers(0, 40), label="moves")):
        moves = ["deliver"] if fleet.broker else []
        if fleet.timer_due():
            moves.append("fire timer")
        if fleet.state is not None and not fleet.state.status.is_final and program.waits:
            moves.append("send event")
        if not moves:
            break
        move = data.draw(st.sampled_from(moves), label="move")
        if move == "deliver":
            index = data.draw(st.integers(0, len(fleet.broker) - 1), label="message")
            fleet.deliver(index, data.draw(st.sampled_from(FATES), label="fate"))
        elif move == "fire timer":
            fleet.fire_timer(data.draw(st.integers(1, 2), label="wakes"))
        else:
            wait = data.draw(st.sampled_from(program.waits), label="event for")
            fleet.send_event(wait, data.draw(st.integers(1, 2), label="copies"))
    fleet.drain()
    return fleet


# -- the properties --------------------------------------------------------------------


@FLEET_SETTINGS
@given(program=programs(), data=st.data())
def test_journal_is_exactly_once(program: Program, data: st.DataObject):
    """However messages are duplicated, reordered, redelivered or rolled back, the journal
    never gets two entries for a position, stays contiguous from 0, records each step the
    program asks for once, and each (position, attempt) of a step runs in one commit only."""
    fleet = simulate(program, data)
    assert fleet.violations == []
    assert [e.seq for e in fleet.journal] == list(range(len(fleet.journal)))
    names = Counter(e.name for e in fleet.journal)
    assert [name for name, count in names.items() if count > 1] == []
    assert [e.name for e in fleet.journal] == [op.name for op in program.ops[: len(fleet.journal)]]
    assert len(set(fleet.runs)) == len(fleet.runs)


@FLEET_SETTINGS
@given(program=programs(), data=st.data())
def test_draining_the_broker_finishes_every_instance(program: Program, data: st.DataObject):
    """No message is lost: once every pending message is delivered and every timer fired,
    the instance is final, complete unless a step gives up (then errored), with exactly the
    journal the program describes; nothing is left waiting or sleeping without a timer."""
    fleet = simulate(program, data)
    status, journal, _ = program.expected()
    state = fleet.state
    assert state is not None
    assert (state.status, state.waiting) == (status, None), state.error
    assert [shape(e) for e in fleet.journal] == journal
    if status is InstanceStatus.ERRORED:
        assert state.error is not None
        assert "gave up" in state.error
    assert fleet.broker == []
    assert not fleet.timer_due()


@FLEET_SETTINGS
@given(program=programs(), data=st.data())
def test_duplicates_and_stale_messages_have_no_effect(program: Program, data: st.DataObject):
    """Duplicate and stale messages are acknowledged without effect: none runs a parked
    instance before its timer is due, nothing is dead-lettered (bar an event first sent after
    the instance failed), and every failed attempt is recorded once, as in a fault-free run."""
    fleet = simulate(program, data)
    assert fleet.early == []
    _, _, attempts = program.expected()
    assert sorted((a.seq, a.name, a.attempt) for a in fleet.attempts) == attempts
    # Only an event first sent after the instance failed may be refused; its repeats are acked.
    assert not [d for d in fleet.dead if d.repeat]
    assert fleet.state is not None
    for letter in fleet.dead:
        assert letter.reason == "instance-finished"
        assert isinstance(letter.envelope.body, EventBody)
        assert fleet.state.status is InstanceStatus.ERRORED  # the program failed before it


def check_events(fleet: Fleet) -> None:
    """Every received entry took one stored event of its wait's type, at its own position,
    with its payload; no event went to two waits; a wait timed out only by its own timer."""
    consumed = {e.consumed_seq: e for e in fleet.events.values() if e.consumed_seq is not None}
    assert len(consumed) == len([e for e in fleet.events.values() if e.consumed_seq is not None])
    received = {e.seq: e for e in fleet.journal if e.kind is EntryKind.EVENT_RECEIVED}
    assert sorted(received) == sorted(consumed)
    for seq, entry in received.items():
        wait = fleet.program.ops[seq]
        assert isinstance(wait, Wait)
        assert (consumed[seq].type, consumed[seq].payload) == (wait.event_type, entry.value)
    timed_out = {e.seq for e in fleet.journal if e.kind is EntryKind.EVENT_TIMED_OUT}
    assert timed_out <= fleet.timed_out_waits


@FLEET_SETTINGS
@given(program=programs(), data=st.data())
def test_an_event_reaches_its_wait_exactly_once(program: Program, data: st.DataObject):
    """An event sent twice (same event id), early or late, is delivered to a wait exactly
    once: every wait the instance reaches receives one event and every event sent is taken
    by one wait (none is lost, none is taken twice)."""
    fleet = simulate(program, data)
    check_events(fleet)
    reached = [e for e in fleet.journal if e.name in {w.name for w in program.waits}]
    assert all(e.kind is EntryKind.EVENT_RECEIVED for e in reached)
    if fleet.state is not None and fleet.state.status is InstanceStatus.COMPLETE:
        assert sorted(e.payload for e in fleet.events.values() if e.consumed_seq is not None) == (
            sorted(json.dumps(w.payload, separators=(",", ":")) for w in program.waits)
        )


@FLEET_SETTINGS
@given(program=programs(), data=st.data())
def test_an_event_or_its_timeout_ends_each_wait_once(program: Program, data: st.DataObject):
    """When event waits may also time out, each wait still ends exactly once (by an event,
    or by its own timer), no event is delivered twice, and the instance finishes."""
    fleet = simulate(program, data, timeouts=True)
    assert fleet.violations == []
    check_events(fleet)
    status, journal, _ = program.expected()
    assert fleet.state is not None
    assert fleet.state.status is status
    assert [shape(e) for e in fleet.journal] == journal


# -- minimal counterexamples of engine bugs these properties found (now fixed) -------------


def test_a_stale_sleep_wake_does_not_time_out_the_next_wait():
    """A second copy of a sleep's wake is stale once the sleep ended, even when the
    workflow now waits for an event at the same journal position and attempt."""
    wait = Wait("approval")
    fleet = Fleet(Program((Sleep("nap", 1000), wait)))
    fleet.deliver()  # create: sleep "nap" recorded at 0; parked at position 1, attempt 1
    fleet.fire_timer(copies=2)  # the wake, sent again (or redelivered after a lost ack)
    fleet.deliver()  # the wake: the workflow waits for "go" at position 1, attempt 1
    fleet.deliver()  # the stale copy of the wake
    fleet.send_event(wait)
    fleet.drain()
    assert fleet.journal[1].kind is EntryKind.EVENT_RECEIVED, fleet.journal[1].value


def test_a_repeated_event_after_the_instance_finished_is_not_dead_lettered():
    """The redelivery of an event (a crash after commit, before the ack) is acknowledged
    without effect, even when that event's delivery completed the instance."""
    wait = Wait("approval")
    fleet = Fleet(Program((wait,)))
    fleet.deliver()  # create: waits for "go"
    fleet.send_event(wait)
    fleet.deliver(fate="redeliver")  # delivered, instance complete; the ack is lost
    assert fleet.state is not None
    assert fleet.state.status is InstanceStatus.COMPLETE
    fleet.deliver()  # the redelivery
    assert [(d.reason, d.repeat) for d in fleet.dead] == []
