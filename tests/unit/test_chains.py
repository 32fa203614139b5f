"""Chains (cycle/chain.py): the steps that follow a guarded write's step run before it, and
one statement writes them all. These run on MemoryStore here, and on PgStore in
tests/integration/test_chains.py (the same tests, another `make_store`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from stepfleet.broker import Outgoing
from stepfleet.cycle.chain import CHAIN_INSTANCES
from stepfleet.schemas import (
    CallRequested,
    Completed,
    EntryKind,
    GuestReport,
    HttpRequest,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    StepFailed,
    StepSucceeded,
    WaitKind,
)
from stepfleet.store import StepWrite
from tests.unit.test_guarded_creates import (  # noqa: F401 (fixtures)
    TOPOLOGY,
    Fleet,
    FleetOf,
    fleet_of,
    make_store,
)


def five_steps(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Steps "s0" to "s4", each returning what the one before returned plus one; then
    complete with the last result."""
    seq = len(entries)
    if seq < 5:
        before = int(entries[-1].value) if entries else 0
        return GuestReport(StepSucceeded(seq, f"s{seq}", str(before + 1)))
    return GuestReport(Completed(seq, entries[-1].value))


def step_then_call(entries: Sequence[JournalEntry], attempt: int, answers: Any) -> GuestReport:
    """Step "reserve", then a step "fetch" that makes an HTTP call, then complete."""
    if not entries:
        return GuestReport(StepSucceeded(0, "reserve", '"r"'))
    if len(entries) == 1 and not answers:
        request = HttpRequest("GET", "http://api.test/")
        return GuestReport(CallRequested(1, "fetch", request, (), deadline=float("inf")))
    if len(entries) == 1:
        return GuestReport(StepSucceeded(1, "fetch", '"f"'))
    return GuestReport(Completed(2, "2"))


def step_then_fail(entries: Sequence[JournalEntry], attempt: int) -> GuestReport:
    """Step "reserve", then a step "charge" whose attempts fail."""
    if not entries:
        return GuestReport(StepSucceeded(0, "reserve", '"r"'))
    return GuestReport(StepFailed(1, "charge", "card declined"))


def internal(fleet: Fleet, instance: str) -> list[Outgoing]:
    """The step messages published for an instance."""
    return [
        m
        for m in fleet.published
        if m.exchange == TOPOLOGY.internal_exchange and m.headers["x-instance-id"] == instance
    ]


@pytest.fixture
def fleets(fleet_of: FleetOf) -> FleetOf:  # noqa: F811 (the imported fixture)
    """Makes the fleets under test (the guarded creates' fleet, with chains)."""
    return fleet_of


def journal(entries: Sequence[JournalEntry]) -> list[tuple[int, EntryKind, str, str]]:
    return [(e.seq, e.kind, e.name, e.value) for e in entries]


async def test_a_create_and_the_steps_after_it_are_written_by_one_statement(
    fleets: FleetOf,
) -> None:
    fleet = await fleets(five_steps)
    await fleet.warm()
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (6, 0)  # five steps and the run that completes
    detail = await fleet.detail("o-1")
    assert (detail.record.status, detail.record.output) == (InstanceStatus.COMPLETE, "5")
    assert journal(detail.journal) == [
        (seq, EntryKind.STEP_SUCCEEDED, f"s{seq}", str(seq + 1)) for seq in range(5)
    ]
    assert internal(fleet, "o-1") == []
    assert await fleet.outbox_ids() == set()


async def test_a_statement_writes_at_most_chain_steps_steps(fleets: FleetOf) -> None:
    fleet = await fleets(five_steps, local_steps=4, chain_steps=2)
    await fleet.warm()
    fleet.inbox.clear()
    warm = await fleet.outbox_ids()  # the warm instance's next step, held here
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (2, 0)
    assert (await fleet.detail("o-1")).record.position == 2
    for position in (4, 5):  # a local next step starts each later chain
        [local] = fleet.inbox
        fleet.inbox.clear()
        result, opened = await fleet.process(local)
        assert (result.steps, opened) == (2, 0)
        assert (await fleet.detail("o-1")).record.position == position
    assert fleet.inbox == []
    detail = await fleet.detail("o-1")
    assert (detail.record.status, detail.record.output) == (InstanceStatus.COMPLETE, "5")
    assert [e.seq for e in detail.journal] == [0, 1, 2, 3, 4]
    assert await fleet.outbox_ids() == warm  # each chain's next step row went with the next


async def test_a_statement_for_many_instances_chains_one_step(fleets: FleetOf) -> None:
    fleet = await fleets(five_steps)
    await fleet.warm()
    creates = [fleet.create(f"o-{i}") for i in range(CHAIN_INSTANCES + 1)]
    result, opened = await fleet.process(*creates)
    assert (result.steps, opened) == (2 * (CHAIN_INSTANCES + 1), 0)
    assert (await fleet.detail("o-0")).record.position == 2


async def test_a_chain_ends_before_a_step_that_makes_a_call(fleets: FleetOf) -> None:
    fleet = await fleets(step_then_call, calling=True)
    await fleet.warm()
    runs = len(fleet.sandbox.runs)
    result, opened = await fleet.process(fleet.create("o-1"))
    # The run that stopped at the call was made, then dropped: nothing of it is written,
    # and its step goes on as a next step, whose own run makes the call.
    assert (result.steps, opened, len(fleet.sandbox.runs) - runs) == (1, 0, 2)
    detail = await fleet.detail("o-1")
    assert (detail.record.status, detail.record.position) == (InstanceStatus.RUNNING, 1)
    assert [e.name for e in detail.journal] == ["reserve"]
    [step] = internal(fleet, "o-1")
    assert json.loads(step.body)["position"] == 1


async def test_a_worker_that_takes_the_step_on_makes_its_call_at_once(fleets: FleetOf) -> None:
    fleet = await fleets(step_then_call, calling=True, local_steps=4)
    await fleet.warm()
    fleet.inbox.clear()
    runs = len(fleet.sandbox.runs)
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (1, 0)
    # The call is made (here refused: the fleet has no egress) with no run of its step
    # again, and the step comes back with the answer.
    [answered] = await fleet.handed_back()
    assert len(fleet.sandbox.runs) - runs == 2
    result, opened = await fleet.process(answered)
    assert (result.steps, opened) == (2, 0)  # "fetch" with the answer, then the end
    assert len(fleet.sandbox.runs) - runs == 4
    detail = await fleet.detail("o-1")
    assert (detail.record.status, detail.record.output) == (InstanceStatus.COMPLETE, "2")
    assert [e.name for e in detail.journal] == ["reserve", "fetch"]
    assert internal(fleet, "o-1") == []


async def test_a_step_that_fails_ends_the_chain_and_its_attempt_is_written_with_it(
    fleets: FleetOf,
) -> None:
    fleet = await fleets(step_then_fail)
    await fleet.warm()
    result, opened = await fleet.process(fleet.create("o-1"))
    assert (result.steps, opened) == (2, 0)
    detail = await fleet.detail("o-1")
    assert [e.name for e in detail.journal] == ["reserve"]
    assert [(a.seq, a.name, a.attempt, a.error) for a in detail.attempts] == [
        (1, "charge", 1, "card declined")
    ]
    waiting = detail.record.waiting
    assert waiting is not None
    assert waiting.kind is WaitKind.RETRY
    assert (detail.record.position, detail.record.attempt) == (1, 2)
    assert internal(fleet, "o-1") == []  # the retry's timer moves it, not a step message


async def test_a_chain_whose_row_moved_writes_none_of_its_steps(fleets: FleetOf) -> None:
    fleet = await fleets(five_steps, local_steps=4, chain_steps=3)
    await fleet.warm()
    fleet.inbox.clear()
    await fleet.process(fleet.create("o-1"))
    [local] = fleet.inbox
    fleet.inbox.clear()
    key = InstanceKey(fleet.tenant, "o-1")
    async with fleet.store.transaction() as tx:  # an operator's pause, between two chains
        row = (await tx.lock_instances([key]))[key]
        paused = StepWrite(
            key, InstanceStatus.PAUSED, row.position, attempt=row.attempt,
            state_bytes=row.state_bytes,
        )  # fmt: skip
        await tx.write_batch([paused], [])
    result, _ = await fleet.process(local)
    assert (result.steps, result.duplicates) == (0, 1)
    detail = await fleet.detail("o-1")
    assert (detail.record.status, detail.record.position) == (InstanceStatus.PAUSED, 3)
    assert [e.name for e in detail.journal] == ["s0", "s1", "s2"]
    assert fleet.inbox == []
