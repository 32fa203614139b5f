"""Several steps of one instance in one write: the runs that follow a step go first.

A guarded statement (cycle/created.py, cycle/unchanged.py) writes a step whose outcome the
worker knew before touching the store. When that step leaves its instance running with the
next step to take at once (no wait, no failed attempt), the worker knows the instance after the
write exactly as well, so it runs the next step's guest right away, over the journal and the
entries not written yet, and so on; the statement then writes every step of the chain with
the last one's state and next step, or none of them (the row moved meanwhile: the transaction
takes the first message as usual). Each step is still journaled once, by that statement; a
crash before it loses runs, not steps, and the message runs them again (as a redelivery does).
One write per chain instead of one per step is most of a short workflow's latency.

A statement for a few instances (`CHAIN_INSTANCES`: a quiet worker's, where the write is most
of a step's time) chains up to `chain_steps` steps; a larger one looks one step ahead only
(there one write serves many steps already, and long chains would hold the others' write back).
A chain ends at a step that waits, fails, or ends its instance, and when a batch's chained
runs have taken `CHAIN_SECONDS`. A run that begins an event wait or needs more than a slice is
dropped and ends the chain before it. A run that stops at an HTTP call ends it too, unwritten:
its step goes on as the next step, whose call the worker that takes it on makes at once
(`NextStep.call`), once the steps before it are written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic

from stepfleet.broker import Outgoing
from stepfleet.cycle.phases import PhaseTimes
from stepfleet.cycle.runner import GuestRunner
from stepfleet.cycle.work import H, NextStep, Ran, Work, state_after
from stepfleet.engine import Decision, EngineLimits, InstanceState, decide
from stepfleet.schemas import (
    CallRequested,
    Envelope,
    InstanceStatus,
    MessageKind,
    StepBody,
    WaitKind,
)

CHAIN_SECONDS = 0.02
"""Guest time a batch's chained runs may take, all chains together (checked between rounds)."""
CHAIN_INSTANCES = 8
"""Most instances a statement may chain `chain_steps` steps to; a statement for more chains
one step (long chains in a busy worker's large batches held the others' write back and skewed
tenants' shares, which the inbox counts by delivery)."""


@dataclass(slots=True)
class Chain(Generic[H]):
    """A step the statement writes and the runs chained to it."""

    first: Ran[H]
    first_decision: Decision
    decision: Decision
    """What the statement writes: every step's entries, the last run's state and next step."""
    chained: list[Ran[H]] = field(default_factory=list)
    """The runs after the first, in order, each with its own decision."""
    calling: Ran[H] | None = None
    """The run of the step after the last that stopped at an HTTP call: nothing of it is
    written, and its step goes on as the next step, with the call (`NextStep.call`)."""

    @property
    def runs(self) -> list[Ran[H]]:
        """Every run of the chain, in order, with its own decision (once written)."""
        return [self.first, *self.chained]

    def next_step(
        self, outbox_id: int, message: Outgoing, envelope: Envelope, state: InstanceState
    ) -> NextStep:
        """The next step the chain's write asks for, with the call its run stopped at."""
        if self.calling is None:
            return NextStep(outbox_id, message, envelope, state)
        call = self.calling.report.outcome
        assert isinstance(call, CallRequested)
        return NextStep(outbox_id, message, envelope, state, call, self.calling.started_at)


class StepChains:
    """Runs the steps that follow guarded writes' steps, for one process's cycles."""

    def __init__(
        self,
        guests: GuestRunner,
        engine_limits: Callable[[str], EngineLimits],
        max_steps: int,
        *,
        phases: PhaseTimes,
    ) -> None:
        """`max_steps`: steps one write may hold (1: no chains); `phases` gets the chained
        runs' time as guest time."""
        self._guests = guests
        self._engine_limits = engine_limits
        self._max_steps = max_steps
        self._phases = phases

    async def extend(
        self, decided: Sequence[tuple[Ran[H], Decision]]
    ) -> tuple[list[Chain[H]], float]:
        """Chain to each decided run (its work's `state` and `replay` set) the steps that
        follow it, round by round across the works, while they fit; return the chains and
        the seconds their runs took."""
        chains = [Chain(item, decision, decision) for item, decision in decided]
        most = self._max_steps if len(chains) <= CHAIN_INSTANCES else min(self._max_steps, 2)
        going = [chain for chain in chains if _goes_on(chain, most)]
        began = time.monotonic()
        running = 0.0
        while going and time.monotonic() - began < CHAIN_SECONDS:
            of_work: dict[int, tuple[Chain[H], Work[H]]] = {}
            for chain in going:
                work = _next_work(chain)
                of_work[id(work)] = chain, work
            # Runs left out (long ones, or for a light batch) end their chains unrun.
            round_began = time.monotonic()
            ran, _ = await self._guests.run_short([work for _, work in of_work.values()])
            running += time.monotonic() - round_began
            going = []
            for item in ran:
                chain = of_work[id(item.work)][0]
                if self._take(chain, item) and _goes_on(chain, most):
                    going.append(chain)
        self._phases.add("guest", running)
        return chains, running

    def _take(self, chain: Chain[H], item: Ran[H]) -> bool:
        """Add a chained run to its chain; False when it ends the chain, unwritten."""
        if isinstance(item.report.outcome, CallRequested):
            chain.calling = item
            return False
        work = item.work
        assert work.state is not None
        assert work.replay is not None
        decision = decide(
            work.state,
            [*work.replay.journal.entries, *work.pending],
            item.report,
            started_at=item.started_at,
            finished_at=item.finished_at,
            limits=self._engine_limits(work.key.tenant),
        )
        waiting = decision.waiting
        if waiting is not None and waiting.kind is WaitKind.EVENT:
            return False  # a stored event may end it: left to the transaction
        item.decision = decision
        chain.chained.append(item)
        chain.decision = replace(decision, entries=(*chain.decision.entries, *decision.entries))
        return True


def _goes_on(chain: Chain[H], most: int) -> bool:
    """Whether the chain's last step leaves the next to be taken at once, and may have it."""
    decision = chain.decision
    return (
        len(chain.chained) + 1 < most
        and decision.publish_step
        and decision.status is InstanceStatus.RUNNING
        and decision.waiting is None
        and decision.failed_attempt is None
    )


def _next_work(chain: Chain[H]) -> Work[H]:
    """The step after the chain's last, as a work over the journal and the chain's entries."""
    first = chain.first.work
    assert first.replay is not None
    state = state_after(first, chain.decision)
    envelope = Envelope(
        MessageKind.STEP,
        first.key.tenant,
        first.key.instance_id,
        state.module,
        StepBody(position=state.position, generation=state.generation),
        first.envelope.traceparent,
    )
    work: Work[H] = Work(first.handle, envelope)
    work.state, work.replay = state, first.replay
    work.pending = chain.decision.entries  # written with the chain, not in the journal yet
    return work
