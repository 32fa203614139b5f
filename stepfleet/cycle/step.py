"""The step cycle: one transaction takes a batch of messages from admission to written state.

For each batch: create and lock the instances (in key order), admit each message against
its instance's state, hold back what is over a tenant's quota, load the journals and
modules, run each admitted guest for exactly one new step, decide, let a run that begins a
wait take an event that is already stored, and write journal rows, instance states and
outbox rows in the same transaction. The caller publishes `CycleResult.messages` after the
commit and acknowledges its messages only then; a crash anywhere leads to redelivery, and the
journal position check turns the redelivery into a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any

import structlog

from stepfleet.broker import Outgoing, Topology
from stepfleet.cycle.admission import Admission, EarlyHold
from stepfleet.cycle.chain import StepChains
from stepfleet.cycle.context import message_context
from stepfleet.cycle.created import GuardedCreates
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.guest import log_run
from stepfleet.cycle.messages import step_message
from stepfleet.cycle.modules import ModuleLoader
from stepfleet.cycle.phases import PhaseTimes
from stepfleet.cycle.priority import LightFirst
from stepfleet.cycle.quotas import apply_quotas
from stepfleet.cycle.replays import ReplayCache, load_replays
from stepfleet.cycle.runner import GuestRunner
from stepfleet.cycle.tracing import carried, open_spans
from stepfleet.cycle.unchanged import Unchanged, UnchangedWrites
from stepfleet.cycle.work import (
    CycleResult,
    Early,
    H,
    NextStep,
    Ran,
    Suspended,
    Work,
    errored,
    state_after,
    write_of,
)
from stepfleet.engine import EngineLimits, decide, resolve_wait
from stepfleet.observe import NO_OBSERVER, Observer
from stepfleet.sandbox import LongRuns, Sandbox
from stepfleet.schemas import (
    CallRequested,
    CreateBody,
    Envelope,
    InstanceKey,
    MessageKind,
    StepBody,
    WaitKind,
)
from stepfleet.store import NewInstance, OutboxMessage, StepWrite
from stepfleet.store.port import StepStore, StepTx

log = structlog.get_logger("stepfleet.worker")


def utcnow() -> datetime:
    """The fleet's clock."""
    return datetime.now(UTC)


class StepCycle:
    """Runs cycles for one process: its sandbox, replay cache and module loader are shared
    by every batch the process handles."""

    def __init__(
        self,
        *,
        store: StepStore,
        sandbox: Sandbox,
        topology: Topology,
        guest_thread: Executor | None = None,
        guest_processes: LongRuns | None = None,
        value_bytes: int = 1024 * 1024,
        limits: EngineLimits | None = None,
        directory: TenantDirectory | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_wake_due: Callable[[datetime], None] | None = None,
        gate: LightFirst | None = None,
        early: EarlyHold[Any] | None = None,
        chain_steps: int = 16,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        """`guest_processes`, else `guest_thread`, runs the guest runs that are not short
        (cycle/runner.py); both None run every one inline, for a process with one cycle at a
        time (`stepfleet run`, tests). `gate` lets light tenants' batches go first
        (cycle/priority.py). `early`: how events that come before their instance are held
        (None: they are dead-lettered `unknown-instance` at once). `chain_steps`: steps of one
        instance a guarded statement may write at once (cycle/chain.py; 1: one step per
        write). `observer` gets the phase times, module loads and delivery spans."""
        self._store = store
        self._early = early
        self.topology = topology
        self._value_bytes = value_bytes
        self._limits = limits or EngineLimits()
        self.directory = directory or TenantDirectory(self._limits)
        self._clock = clock
        self._on_wake_due = on_wake_due
        self._replays = ReplayCache()
        self._owned: set[tuple[str, str]] = set()
        """(tenant, module) pairs known to be pushed (see Admission)."""
        self.gate = gate or LightFirst()
        self._guests = GuestRunner(
            sandbox,
            guest_thread,
            self.directory.limits,
            clock,
            gate=self.gate,
            processes=guest_processes,
        )
        self._modules = ModuleLoader(sandbox, self._guests.on_guest_thread, observer)
        self._observer = observer
        self.phases = PhaseTimes(observer=observer)
        """Time spent in transactions and guest runs (the driver adds its own phases)."""
        chains = StepChains(
            self._guests, self.directory.engine_limits, chain_steps, phases=self.phases
        )
        self._unchanged = UnchangedWrites(store, topology, self.directory, chains, observer, clock)
        self._creates = GuardedCreates(
            store=store,
            topology=topology,
            directory=self.directory,
            guests=self._guests,
            chains=chains,
            sandbox=sandbox,
            owned=self._owned,
            has_quotas=self._has_quotas,
            value_bytes=value_bytes,
            phases=self.phases,
            observer=observer,
        )

    async def run(
        self, works: list[Work[H]], *, confirmed_outbox: Sequence[int] = ()
    ) -> CycleResult[H]:
        """Take `works` (at most one per instance) through one transaction, but for the
        creates and next steps a guarded statement writes first (cycle/created.py,
        cycle/unchanged.py).

        `confirmed_outbox` are outbox rows whose publish the broker confirmed since: the
        first statement deletes them.

        Raises:
            StoreUnavailable: the transaction committed nothing; the caller retries the batch
                (what a guarded statement wrote before is then found as duplicates).
        """
        result: CycleResult[H] = CycleResult()
        for work in works:
            work.renew()
        works = await self._speculate(works, result)
        written: list[Unchanged[H]] = []
        for guarded in (self._write_created, self._write_unchanged):
            done = await guarded(works, result, confirmed_outbox)
            if done is not None:
                works, confirmed_outbox = done.rest, ()
                written.append(done)
                assert done.span is not None
                first = done.span[0] if result.transaction is None else result.transaction[0]
                result.transaction = (first, done.span[1])
        ran_before = [item for done in written for item in done.ran]
        next_before = [step for done in written for step in done.next_steps]
        intents_before = [intent for done in written for intent in done.intents]
        # Added once the transaction is done: its own write keeps outbox rows for the
        # waiting creates in `result.suspended`, and these have theirs already.
        suspended_before = [waiting for done in written for waiting in done.suspended]
        if not works and not confirmed_outbox:
            if written:
                result.suspended += suspended_before
                self._committed(result, ran_before, next_before, intents_before, [])
            return result  # every run was written already, or waits for its call
        began = time.monotonic()
        try:
            next_steps, intents, ran, held = await self._transaction(
                works, result, confirmed_outbox, began
            )
        finally:
            ended = time.monotonic()
            first = began if result.transaction is None else result.transaction[0]
            result.transaction = (first, ended)
            self.phases.add("guest", result.guest_seconds)
            self.phases.add("transaction", ended - began - result.guest_seconds)
        result.suspended += suspended_before
        self._committed(
            result, ran_before + ran, next_before + next_steps, intents_before + intents, held
        )
        return result

    async def _write_created(
        self, works: list[Work[H]], result: CycleResult[H], confirmed_outbox: Sequence[int]
    ) -> Unchanged[H] | None:
        """Run and write the creates that need no transaction (cycle/created.py); None when
        no statement ran."""
        return await self._creates.write(works, result.duplicates, confirmed_outbox)

    async def _write_unchanged(
        self, works: list[Work[H]], result: CycleResult[H], confirmed_outbox: Sequence[int]
    ) -> Unchanged[H] | None:
        """Write the next steps whose rows are as this worker left them (cycle/unchanged.py);
        None when there were none."""
        if not any(w.early for w in works):
            return None
        began = time.monotonic()
        done = None
        try:
            done = await self._unchanged.write(works, confirmed_outbox)
            return done
        finally:  # its chained runs count as guest time (cycle/chain.py adds them)
            chained = done.guest_seconds if done is not None else 0.0
            self.phases.add("transaction", time.monotonic() - began - chained)

    def _committed(
        self,
        result: CycleResult[H],
        ran: list[Ran[H]],
        next_steps: list[NextStep],
        intents: list[tuple[Work[H], int]],
        held: list[StepWrite],
    ) -> None:
        """Fill `result` once everything of the cycle is committed."""
        # Committed: a create whose first step waits on a call goes on as that step.
        for work, intent in intents:
            work.intent = intent
            work.envelope = Envelope(
                MessageKind.STEP,
                work.key.tenant,
                work.key.instance_id,
                work.module,
                StepBody(position=0, generation=0),
                carried(work),
            )
            if work.state is not None and work.replay is not None:
                # Its row is the new instance as admission made it: the resumed attempt runs
                # before any transaction, on that state, like a local next step (_speculate).
                work.expected = work.state
                self._replays.put(work.key, work.replay)
        result.ran = ran
        result.held = len(held)
        result.held_keys = {w.key for w in held}
        result.next_steps = next_steps
        self._remember(ran)
        self._note_timers([d.waiting.wake_at for i in ran if (d := i.decision) and d.waiting])
        self._note_timers([w.waiting.wake_at for w in held if w.waiting])

    async def _speculate(self, works: list[Work[H]], result: CycleResult[H]) -> list[Work[H]]:
        """Run before the transaction the guests of next steps this worker wrote itself, on
        the instance as it wrote it; return the works that still need the transaction.

        A run that stops at an HTTP call needs nothing from the store (nothing of it is
        written), so it waits for its call without a transaction at all. The run that resumes
        it runs here too, with the answers: kept if it ends the step, while one that asks for
        another call goes through admission first (a pause or cancel committed while the last
        call was in flight must stop it before the next). A run that goes long is set apart
        (cycle/runner.py) and taken by the transaction of the cycle its work comes back to, if
        the instance has not moved. Any other run is kept for the guarded write
        (cycle/unchanged.py) or the transaction, which use it if the instance is still the one
        the run saw. Tenants with running-step or rate limits are left to the transaction,
        where those are counted.
        """
        early: list[Work[H]] = []
        for work in works:
            expected = work.expected
            if expected is None or work.apart is not None or self._has_quotas(work.key.tenant):
                continue
            replay = self._replays.exactly(work.key, expected.generation, expected.position)
            if replay is None:
                continue
            work.state, work.replay = expected, replay
            early.append(work)
        if not early:
            return works
        began = time.monotonic()
        ran, apart = await self._guests.run_or_set_apart(early)
        self.phases.add("guest", time.monotonic() - began)
        for going in apart:  # nothing to write until its run is done: no transaction yet
            going.work.apart = going
            result.apart.append(going)
        # A resumed attempt that asks for another call goes through admission first: a pause
        # or cancel committed while its last call was in flight stops it before the next.
        again = {id(i.work) for i in ran if i.work.answers and _calls(i)}
        for item in self._set_aside_calls([i for i in ran if id(i.work) not in again], result):
            replay = item.work.replay
            assert replay is not None
            item.work.early = Early(item, replay, len(replay.journal))
        for work in early:
            work.state = work.replay = None  # the transaction's admission sets them again
        waiting = {id(s.work) for s in result.suspended} | {id(a.work) for a in result.apart}
        return [w for w in works if id(w) not in waiting]

    def _has_quotas(self, tenant: str) -> bool:
        own = self.directory.limits(tenant)
        return bool(own.running_steps or own.steps_per_second)

    async def _transaction(
        self,
        works: list[Work[H]],
        result: CycleResult[H],
        confirmed_outbox: Sequence[int],
        began: float,
    ) -> tuple[list[NextStep], list[tuple[Work[H], int]], list[Ran[H]], list[StepWrite]]:
        """The transaction of `run`: from admission to the write; returns the next steps,
        the outbox rows kept for waiting creates, the runs and the parked writes."""
        async with self._store.transaction() as tx:
            now = self._clock()
            admission = Admission(
                tx, result, value_bytes=self._value_bytes, owned=self._owned, early=self._early
            )
            admitted = await admission.admit(works, now)
            open_spans(self._observer, works, began)  # the rows are locked: their traces known
            admitted, held = await apply_quotas(tx, self.directory, admitted, now)
            await load_replays(tx, self._replays, admitted)
            admitted, refused = await self._modules.load(tx, admitted, now)
            early = [w.early.ran for w in admitted if w.early and w.early.still_holds(w)]
            early += [a.ran(now) for w in admitted if (a := w.apart) and a.holds(w)]
            taken = {id(item.work) for item in early}
            guest_began = time.monotonic()
            ran = refused + early
            done, apart = await self._guests.run_or_set_apart(
                [w for w in admitted if id(w) not in taken]
            )
            ran += done
            for going in apart:
                going.work.apart = going
            result.apart += apart
            result.guest_seconds = time.monotonic() - guest_began
            ran = self._set_aside_calls(ran, result)
            for item in ran:
                self._decide(item)
            # Created first, so that the events held for the new instances are stored before
            # their first runs' waits look for them.
            ran, held = await self._insert_created(tx, works, ran, held, result)
            await self._take_waiting_events(tx, ran)
            events = admission.kept_events + [e for i in ran if (e := i.work.new_event)]
            if events:
                await tx.insert_events(events)
            next_steps, intents = await self._write(tx, ran, held, result, confirmed_outbox)
        return next_steps, intents, ran, held

    async def _write(
        self,
        tx: StepTx,
        ran: list[Ran[H]],
        held: list[StepWrite],
        result: CycleResult[H],
        confirmed_outbox: Sequence[int],
    ) -> tuple[list[NextStep], list[tuple[Work[H], int]]]:
        """Write the decisions, the parked instances and the next steps' outbox rows in one
        statement; return the next steps to send after the commit, and the outbox rows kept
        for creates whose first step waits on a call."""
        continuing = [
            (item.work, d) for item in ran if (d := item.decision) is not None and d.publish_step
        ]
        envelopes = [
            Envelope(
                MessageKind.STEP,
                work.key.tenant,
                work.key.instance_id,
                work.module,
                StepBody(position=d.position, generation=work.generation),
                carried(work),
            )
            for work, d in continuing
        ]
        steps = [_step_message(self.topology, envelope) for envelope in envelopes]
        # A create whose first step waits on a call, or whose first run goes on apart in a
        # guest process: its row is written now, with the step
        # message that carries on after a crash (kept in the outbox, published only by the
        # relay if the attempt is never finished; the write that finishes it deletes it).
        waiting_creates = [s.work for s in result.suspended if s.work.created]
        waiting_creates += [a.work for a in result.apart if a.work.created]
        intents = [
            step_message(self.topology, w.key, w.module, 0, 0, carried(w))[0]
            for w in waiting_creates
        ]
        ids = await tx.write_batch(
            [write_of(i.work.key, d, carried(i.work)) for i in ran if (d := i.decision) is not None]
            + held,
            [row for row, _ in steps] + intents,
            confirmed_outbox=[
                *confirmed_outbox,
                *(i.work.intent for i in ran if i.work.intent is not None),
            ],
        )
        next_steps = [
            NextStep(outbox_id, message, envelope, state_after(work, d))
            for outbox_id, (_, message), envelope, (work, d) in zip(
                ids[: len(steps)], steps, envelopes, continuing, strict=True
            )
        ]
        kept = list(zip(waiting_creates, ids[len(steps) :], strict=True))
        return next_steps, kept

    @staticmethod
    def _set_aside_calls(ran: list[Ran[H]], result: CycleResult[H]) -> list[Ran[H]]:
        """Take out the runs that stopped at an HTTP call: nothing of theirs is written now."""
        decided: list[Ran[H]] = []
        for item in ran:
            call = item.report.outcome
            if isinstance(call, CallRequested):
                item.work.started_at = item.work.started_at or item.started_at
                result.suspended.append(Suspended(item.work, call))
                with message_context(item.work, step=call.name, position=call.seq):
                    log.debug("step_waits_for_call", calls=len(call.answered) + 1)
            else:
                decided.append(item)
        return decided

    @staticmethod
    async def _insert_created(
        tx: StepTx,
        works: list[Work[H]],
        ran: list[Ran[H]],
        held: list[StepWrite],
        result: CycleResult[H],
    ) -> tuple[list[Ran[H]], list[StepWrite]]:
        """Insert the rows of the instances creates made, with their first write. A create
        another worker inserted meanwhile (the same message, delivered twice) is a duplicate:
        its run is dropped."""
        writing = (
            {i.work.key for i in ran}
            | {w.key for w in held}
            | {s.work.key for s in result.suspended}
            | {a.work.key for a in result.apart}
        )
        created = sorted((w for w in works if w.created and w.key in writing), key=lambda w: w.key)
        if not created:
            return ran, held
        inserted = await tx.create_instances(
            [
                NewInstance(
                    w.key,
                    w.module,
                    w.replay.params if w.replay else "{}",
                    w.envelope.body.retention_seconds
                    if isinstance(w.envelope.body, CreateBody)
                    else None,
                )
                for w in created
            ]
        )
        if inserted:
            adopted = await tx.adopt_early_events(sorted(inserted))
            if adopted:
                log.info("early_events_taken", count=adopted)
        lost = {w.key for w in created if w.key not in inserted}
        if not lost:
            return ran, held
        for work in (
            [i.work for i in ran]
            + [s.work for s in result.suspended]
            + [a.work for a in result.apart]
        ):
            if work.key in lost:
                result.duplicates.append(work)
                with message_context(work):
                    log.info("duplicate_ignored", kind="create", why="instance already exists")
        result.suspended = [s for s in result.suspended if s.work.key not in lost]
        result.apart = [a for a in result.apart if a.work.key not in lost]
        return [i for i in ran if i.work.key not in lost], [w for w in held if w.key not in lost]

    async def error_instance(self, key: InstanceKey, message: str) -> bool:
        """End a live instance as errored with `message` (its step can never be processed);
        return False when it is gone or final already."""
        async with self._store.transaction() as tx:
            record = (await tx.lock_instances([key])).get(key)
            if record is None or record.status.is_final:
                return False
            await tx.write_batch([errored(record, message)], [])
        self._replays.drop(key)
        log.error(
            "instance_errored",
            tenant=key.tenant,
            instance=key.instance_id,
            module_digest=record.module,
            position=record.position,
            error=message,
        )
        return True

    def _decide(self, item: Ran[H]) -> None:
        work = item.work
        assert work.replay is not None
        assert work.state is not None
        item.decision = decide(
            work.state,
            work.replay.journal.entries,
            item.report,
            started_at=item.started_at,
            finished_at=item.finished_at,
            limits=self.directory.engine_limits(work.key.tenant),
            pending=work.pending,
        )
        log_run(item)

    async def _take_waiting_events(self, tx: StepTx, ran: list[Ran[H]]) -> None:
        """A run that has just begun a wait takes an event that arrived before it."""
        waits = [
            (item.work.key, d.waiting.event_type, d.position)
            for item in ran
            if (d := item.decision) is not None
            and d.waiting is not None
            and d.waiting.kind is WaitKind.EVENT
            and d.waiting.event_type is not None
        ]
        if not waits:
            return
        taken = await tx.take_events(waits)
        for item in ran:
            if item.work.key in taken and item.decision is not None:
                key = item.work.key
                log.info("stored_event_delivered", tenant=key.tenant, instance=key.instance_id)
                item.decision = resolve_wait(item.decision, *taken[key], self._limits)

    def _note_timers(self, due: list[datetime]) -> None:
        """Tell the timer loop about the earliest wake this cycle scheduled."""
        if due and self._on_wake_due is not None:
            self._on_wake_due(min(due))

    def _remember(self, ran: list[Ran[H]]) -> None:
        """After commit: keep the journals of instances that go on, forget finished ones."""
        for item in ran:
            work, decision = item.work, item.decision
            if decision is None or decision.status.is_final or work.replay is None:
                self._replays.drop(work.key)
                continue
            journal = work.replay.journal
            for entry in decision.entries:
                if entry.seq == len(journal):
                    journal.append(entry)
            self._replays.put(work.key, work.replay)


def _calls(item: Ran[Any]) -> bool:
    """Whether the run stopped at an HTTP call."""
    return isinstance(item.report.outcome, CallRequested)


def _step_message(topology: Topology, envelope: Envelope) -> tuple[OutboxMessage, Outgoing]:
    """The outbox row and message of a next step's envelope."""
    assert isinstance(envelope.body, StepBody)
    assert envelope.module is not None
    return step_message(
        topology,
        InstanceKey(envelope.tenant, envelope.instance_id),
        envelope.module,
        envelope.body.position,
        envelope.body.generation,
        envelope.traceparent,
    )
