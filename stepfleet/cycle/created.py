"""Creates that need no transaction block: their first run goes first, one statement writes it.

A create of a module the worker knows as pushed and has loaded, for a tenant without quotas,
needs nothing from the store before its first run: admission would build the new instance
(running, at position 0, its params' size) and nothing else. So its guest runs before any
transaction, the engine decides, and `StepStore.write_created` inserts the row in its new
state with the step's journal entries and next step, adopting the events held for it, in one
statement that is its own transaction. A row that existed already makes the create a
duplicate, as the transaction's insert does.

A first run that stops at an HTTP call is written by the same statement: the new row, as
admission would make it (nothing of the step is written yet), and the outbox row of its step
message (kept, published only by the relay should the attempt never be finished; the write that
finishes it deletes it). Its call is made once the statement committed, like a call of the
transaction's creates, and the create goes on as that step (`Unchanged.intents`).

Anything that would read more goes through the transaction as before, with the run made here
kept for it (`Early.created`): a run that begins an event wait (a held event may end it),
a create whose row came meanwhile with other code, and every create of a statement that found
a hold of early events of its keys under way. Runs that need more than a slice
are not made here at all: the transaction runs them, on the guest thread or apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import structlog

from stepfleet.broker import Outgoing, Topology
from stepfleet.cycle.admission import compact_json
from stepfleet.cycle.chain import Chain, StepChains
from stepfleet.cycle.context import message_context
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.guest import log_run
from stepfleet.cycle.messages import step_message
from stepfleet.cycle.phases import PhaseTimes
from stepfleet.cycle.replays import CachedReplay
from stepfleet.cycle.runner import GuestRunner
from stepfleet.cycle.tracing import carried, open_spans
from stepfleet.cycle.unchanged import Unchanged
from stepfleet.cycle.work import Early, H, Ran, Suspended, Work, state_after, write_of
from stepfleet.engine import Decision, InstanceState, check_size, decide
from stepfleet.observe import Observer
from stepfleet.sandbox import ReplayJournal, Sandbox
from stepfleet.schemas import (
    CallRequested,
    CreateBody,
    Envelope,
    InstanceStatus,
    MessageKind,
    StepBody,
    WaitKind,
)
from stepfleet.store import CreatesWritten, GuardedCreate, NewInstance, StepWrite
from stepfleet.store.port import StepStore

log = structlog.get_logger("stepfleet.worker")


class GuardedCreates:
    """Runs and writes the creates that fit, before (and instead of) the transaction."""

    def __init__(
        self,
        *,
        store: StepStore,
        topology: Topology,
        directory: TenantDirectory,
        guests: GuestRunner,
        chains: StepChains,
        sandbox: Sandbox,
        owned: set[tuple[str, str]],
        has_quotas: Callable[[str], bool],
        value_bytes: int,
        phases: PhaseTimes,
        observer: Observer,
    ) -> None:
        """`owned`: the (tenant, module) pairs admission found pushed (shared with it)."""
        self._store = store
        self._topology = topology
        self._directory = directory
        self._guests = guests
        self._chains = chains
        self._sandbox = sandbox
        self._owned = owned
        self._has_quotas = has_quotas
        self._value_bytes = value_bytes
        self._phases = phases
        self._observer = observer

    async def write(
        self, works: list[Work[H]], duplicates: list[Work[H]], confirmed_outbox: Sequence[int]
    ) -> Unchanged[H] | None:
        """Run and write the creates among `works` that fit (with `confirmed_outbox`
        deleted), adding those whose row existed to `duplicates`; None when no statement
        ran. The works left to the transaction keep their runs as `Work.early`."""
        fitting = [w for w in works if self._fits(w)]
        if not fitting:
            return None
        began = time.monotonic()
        ran, _ = await self._guests.run_short(fitting)
        self._phases.add("guest", time.monotonic() - began)
        decided: list[tuple[Ran[H], Decision]] = []
        calling: list[Ran[H]] = []
        for item in ran:
            decision = self._decided(item)
            if decision is not None:
                decided.append((item, decision))
            elif isinstance(item.report.outcome, CallRequested):
                calling.append(item)
        chains, _ = await self._chains.extend(decided)
        for work in fitting:  # the transaction's admission sets them again; a written
            work.state = work.replay = None  # run's are given back (`Early.created`)
        if not chains and not calling:
            return None
        return await self._write(works, chains, calling, duplicates, confirmed_outbox)

    def _fits(self, work: Work[H]) -> bool:
        """Whether a work is a create the statement may write; if so, give it the new
        instance admission would make."""
        body = work.envelope.body
        if (
            not isinstance(body, CreateBody)
            or work.apart is not None
            or work.answers
            or self._has_quotas(work.key.tenant)
            or (work.key.tenant, work.module) not in self._owned
            or not self._sandbox.is_loaded(work.module)
        ):
            return False
        params = compact_json(body.params)
        if check_size("params", params, self._value_bytes) is not None:
            return False  # the transaction dead-letters it
        work.state = InstanceState(
            work.key, work.module, InstanceStatus.RUNNING, 0, state_bytes=len(params.encode())
        )
        work.replay = CachedReplay(0, params, ReplayJournal())
        return True

    def _decided(self, item: Ran[H]) -> Decision | None:
        """The decision of a run the statement may write; else None, the run kept for the
        transaction."""
        work = item.work
        assert work.state is not None
        assert work.replay is not None
        work.early = Early(item, work.replay, 0, created=work.state)
        if isinstance(item.report.outcome, CallRequested):
            return None  # written without a decision: nothing of its step is yet
        decision = decide(
            work.state,
            (),
            item.report,
            started_at=item.started_at,
            finished_at=item.finished_at,
            limits=self._directory.engine_limits(work.key.tenant),
        )
        waiting = decision.waiting
        if waiting is not None and waiting.kind is WaitKind.EVENT:
            return None  # a held event may end it: the transaction's insert adopts, then takes
        return decision

    async def _write(
        self,
        works: list[Work[H]],
        chains: list[Chain[H]],
        calling: list[Ran[H]],
        duplicates: list[Work[H]],
        confirmed_outbox: Sequence[int],
    ) -> Unchanged[H]:
        began = time.monotonic()
        firsts = [chain.first.work for chain in chains] + [item.work for item in calling]
        open_spans(self._observer, firsts, began)
        creates = [self._guarded(chain.first.work, chain.decision) for chain in chains]
        waiting = [self._waiting(item.work) for item in calling]
        try:
            written = await self._store.write_created(
                [c for c, _ in creates] + waiting, confirmed_outbox=confirmed_outbox
            )
        finally:
            self._phases.add("transaction", time.monotonic() - began)
        done = Unchanged[H](span=(began, time.monotonic()))
        if written.adopted:
            log.info("early_events_taken", count=written.adopted)
        if written.busy:  # a hold of their events was under way: the transaction takes them
            log.debug("guarded_creates_busy", creates=len(creates) + len(waiting))
        taken: set[int] = set()
        for chain, (_, step) in zip(chains, creates, strict=True):
            item = chain.first
            work = item.work
            if not self._taken(work, written, duplicates):
                continue
            taken.add(id(work))
            item.decision = chain.first_decision
            log_run(item)
            if not work.created:
                continue  # a duplicate
            done.ran.append(item)
            for later in chain.chained:
                log_run(later)
                done.ran.append(later)
            if step is not None and (outbox_id := written.inserted.get(work.key)) is not None:
                envelope, message = step
                state = state_after(work, chain.decision)
                done.next_steps.append(chain.next_step(outbox_id, message, envelope, state))
        for item in calling:
            work = item.work
            if not self._taken(work, written, duplicates):
                continue
            taken.add(id(work))
            if not work.created:
                continue  # a duplicate
            call = item.report.outcome
            assert isinstance(call, CallRequested)
            outbox_id = written.inserted[work.key]
            assert outbox_id is not None
            work.started_at = work.started_at or item.started_at
            done.suspended.append(Suspended(work, call))
            done.intents.append((work, outbox_id))
            with message_context(work, step=call.name, position=call.seq):
                log.debug("step_waits_for_call", calls=len(call.answered) + 1)
        done.rest = [w for w in works if id(w) not in taken]
        return done

    @staticmethod
    def _taken(work: Work[H], written: CreatesWritten, duplicates: list[Work[H]]) -> bool:
        """Whether the statement decided the create: inserted its row (`work.created`) or
        found it there with the same module (a duplicate, added to `duplicates`). Else the
        transaction admits it (a row of other code is refused there)."""
        inserted = not written.busy and work.key in written.inserted
        existed = not written.busy and written.existing.get(work.key) == work.module
        if not inserted and not existed:
            return False
        assert work.early is not None
        work.state, work.replay = work.early.created, work.early.replay
        if existed:
            duplicates.append(work)
            with message_context(work):
                log.info("duplicate_ignored", kind="create", why="instance already exists")
        else:
            work.created = True
        return True

    def _waiting(self, work: Work[H]) -> GuardedCreate:
        """The row of a create whose first run stopped at a call, as admission would make it,
        with its step message kept in the outbox."""
        assert work.early is not None
        assert work.early.created is not None
        body = work.envelope.body
        assert isinstance(body, CreateBody)
        traceparent = carried(work)
        created = work.early.created
        row, _ = step_message(self._topology, work.key, work.module, 0, 0, traceparent)
        new = NewInstance(work.key, work.module, work.early.replay.params, body.retention_seconds)
        write = StepWrite(
            work.key,
            InstanceStatus.RUNNING,
            0,
            state_bytes=created.state_bytes,
            traceparent=traceparent,
        )
        return GuardedCreate(new, write, row)

    def _guarded(
        self, work: Work[H], decision: Decision
    ) -> tuple[GuardedCreate, tuple[Envelope, Outgoing] | None]:
        """The create's row and first write, with its next step (as the envelope a local
        run takes and the message a publish sends)."""
        assert work.early is not None
        body = work.envelope.body
        assert isinstance(body, CreateBody)
        traceparent = carried(work)
        step: tuple[Envelope, Outgoing] | None = None
        row = None
        if decision.publish_step:
            envelope = Envelope(
                MessageKind.STEP,
                work.key.tenant,
                work.key.instance_id,
                work.module,
                StepBody(position=decision.position, generation=0),
                traceparent,
            )
            row, message = step_message(
                self._topology, work.key, work.module, decision.position, 0, traceparent
            )
            step = (envelope, message)
        new = NewInstance(work.key, work.module, work.early.replay.params, body.retention_seconds)
        return GuardedCreate(new, write_of(work.key, decision, traceparent), row), step
