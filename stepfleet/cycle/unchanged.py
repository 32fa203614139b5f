"""Next steps that need no transaction block: one guarded statement writes them.

A worker that runs the next step it wrote itself ran its guest before any transaction, on
the instance as its own write left it (StepCycle._speculate). If the row is still that row,
nothing the transaction would read can change the outcome: admission, the decision and the
next step are known before touching the store. So such steps skip the transaction's lock,
reads and commit round trips: `StepStore.write_unchanged` writes each one only where its row
is still the expected one, in one statement that is its own transaction. A step whose row
moved on meanwhile (an operator's pause, a restart, another worker's write) is left out and
goes through the full transaction like any other delivery, its guest run again if need be.

Steps that would read more than their row are left to the transaction too: a run that
begins an event wait (a stored event may end it), or a tenant with quotas (counted there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic

from stepfleet.broker import Outgoing, Topology
from stepfleet.cycle.chain import StepChains
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.guest import log_run
from stepfleet.cycle.messages import step_message
from stepfleet.cycle.tracing import carried, open_spans
from stepfleet.cycle.work import H, NextStep, Ran, Suspended, Work, state_after, write_of
from stepfleet.engine import Admit, Decision, InstanceState, admit, decide
from stepfleet.observe import Observer
from stepfleet.schemas import Envelope, MessageKind, StepBody, WaitKind
from stepfleet.store import ExpectedRow, GuardedWrite, OutboxMessage
from stepfleet.store.port import StepStore


@dataclass(slots=True)
class Unchanged(Generic[H]):
    """What the guarded statement did: the runs it wrote, their next steps, and the works it
    left to the transaction."""

    ran: list[Ran[H]] = field(default_factory=list)
    next_steps: list[NextStep] = field(default_factory=list)
    rest: list[Work[H]] = field(default_factory=list)
    span: tuple[float, float] | None = None
    """When the statement ran (monotonic seconds), if it did."""
    guest_seconds: float = 0.0
    """How long the runs chained to its steps took (cycle/chain.py)."""
    suspended: list[Suspended[H]] = field(default_factory=list)
    """Creates written with their first run stopped at an HTTP call (cycle/created.py)."""
    intents: list[tuple[Work[H], int]] = field(default_factory=list)
    """Those creates' step messages, kept in the outbox: their outbox ids."""


class UnchangedWrites:
    """Writes the next steps whose rows are as their worker left them, in one statement."""

    def __init__(
        self,
        store: StepStore,
        topology: Topology,
        directory: TenantDirectory,
        chains: StepChains,
        observer: Observer,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._topology = topology
        self._directory = directory
        self._chains = chains
        self._observer = observer
        self._clock = clock

    async def write(
        self, works: list[Work[H]], confirmed_outbox: Sequence[int]
    ) -> Unchanged[H] | None:
        """Write the works that fit (with `confirmed_outbox` deleted); None when none fits,
        and nothing was done."""
        now = self._clock()
        fitting: list[tuple[Ran[H], Decision]] = []
        rest: list[Work[H]] = []
        for work in works:
            decided = self._decided(work, now)
            if decided is None:
                rest.append(work)
            else:
                fitting.append(decided)
        if not fitting:
            return None
        chains, chained_seconds = await self._chains.extend(fitting)
        began = time.monotonic()
        open_spans(self._observer, [item.work for item, _ in fitting], began)
        guarded = [self._guarded(chain.first.work, chain.decision) for chain in chains]
        applied = await self._store.write_unchanged(
            [g for g, _ in guarded], confirmed_outbox=confirmed_outbox
        )
        done = Unchanged[H](rest=rest, span=(began, time.monotonic()))
        done.guest_seconds = chained_seconds
        for chain, (_, step) in zip(chains, guarded, strict=True):
            work = chain.first.work
            if work.key not in applied:
                work.state = work.replay = None  # the transaction locks the row as it is
                done.rest.append(work)
                continue
            chain.first.decision = chain.first_decision
            for item in chain.runs:
                log_run(item)
                done.ran.append(item)
            outbox_id = applied[work.key]
            if step is not None and outbox_id is not None:
                envelope, message = step
                state = state_after(work, chain.decision)
                done.next_steps.append(chain.next_step(outbox_id, message, envelope, state))
        return done

    def _decided(self, work: Work[H], now: datetime) -> tuple[Ran[H], Decision] | None:
        """The run and decision of a work that fits the guarded write, else None."""
        expected, early = work.expected, work.early
        if (
            expected is None
            or early is None
            or work.envelope.kind is not MessageKind.STEP
            or expected.waiting is not None
            or len(early.replay.journal) != early.length
        ):
            return None
        verdict = admit(work.envelope, expected, created_now=False, now=now)
        if not isinstance(verdict, Admit) or verdict.resolution is not None or verdict.woken:
            return None
        item = early.ran
        decision = decide(
            expected,
            early.replay.journal.entries,
            item.report,
            started_at=item.started_at,
            finished_at=item.finished_at,
            limits=self._directory.engine_limits(work.key.tenant),
        )
        waiting = decision.waiting
        if waiting is not None and waiting.kind is WaitKind.EVENT:
            return None  # an event stored before the wait may end it: the transaction looks
        work.state, work.replay = expected, early.replay
        return item, decision

    def _guarded(
        self, work: Work[H], decision: Decision
    ) -> tuple[GuardedWrite, tuple[Envelope, Outgoing] | None]:
        """The write of a decision on the row the work expects, with its next step (as
        the envelope a local run takes and the message a publish sends)."""
        assert work.state is not None
        traceparent = carried(work)
        step: tuple[Envelope, Outgoing] | None = None
        row: OutboxMessage | None = None
        if decision.publish_step:
            body = StepBody(position=decision.position, generation=work.state.generation)
            envelope = Envelope(
                MessageKind.STEP,
                work.key.tenant,
                work.key.instance_id,
                work.module,
                body,
                traceparent,
            )
            row, message = step_message(
                self._topology,
                work.key,
                work.module,
                body.position,
                body.generation,
                traceparent,
            )
            step = (envelope, message)
        write = GuardedWrite(
            write_of(work.key, decision, traceparent),
            expected_row(work.state),
            next_step=row,
            finishes=work.intent,
        )
        return write, step


def expected_row(state: InstanceState) -> ExpectedRow:
    """The row a state is read from (state_of's inverse, for the columns it reads)."""
    return ExpectedRow(
        state.key,
        state.module,
        state.status,
        state.position,
        state.generation,
        state.attempt,
        state.mode,
        state.end_status,
        state.error,
        state.state_bytes,
    )
