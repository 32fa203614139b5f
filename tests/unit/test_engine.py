"""The replay engine's rules, with no services: admission and the meaning of guest outcomes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from stepfleet.engine import Admit, Duplicate, InstanceState, Reject, admit, decide
from stepfleet.schemas import (
    Completed,
    CreateBody,
    EntryKind,
    Envelope,
    GuestCrashed,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    MessageKind,
    Nondeterministic,
    StepBody,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
)

KEY = InstanceKey("acme", "order-1")
MODULE = "sha256:" + "a" * 64
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)


def journal(*names: str) -> list[JournalEntry]:
    return [
        JournalEntry(seq, EntryKind.STEP_SUCCEEDED, name, f'{{"n":{seq}}}')
        for seq, name in enumerate(names)
    ]


def state(position: int, status: InstanceStatus = InstanceStatus.RUNNING) -> InstanceState:
    return InstanceState(KEY, MODULE, status, position)


def step_envelope(position: int, module: str | None = MODULE) -> Envelope:
    return Envelope(
        MessageKind.STEP, KEY.tenant, KEY.instance_id, module, StepBody(position=position)
    )


def run(
    entries: list[JournalEntry], outcome: object, status: InstanceStatus = InstanceStatus.RUNNING
):
    return decide(state(len(entries), status), entries, outcome, started_at=T0, finished_at=T1)  # type: ignore[arg-type]


def test_new_step_is_recorded_at_the_journal_end_and_schedules_the_next():
    """A successful new step becomes the next journal entry and asks for the following step."""
    decision = run(journal("reserve"), StepSucceeded(1, "charge", '{"ok":true}'))
    assert decision.status is InstanceStatus.RUNNING
    assert decision.entry == JournalEntry(
        1, EntryKind.STEP_SUCCEEDED, "charge", '{"ok":true}', 1, T0, T1
    )
    assert decision.position == 2
    assert decision.next_position == 2


def test_first_step_of_an_empty_journal():
    """The first run of a fresh instance records position 0."""
    decision = run([], StepSucceeded(0, "reserve", "1"))
    assert decision.entry is not None
    assert decision.entry.seq == 0
    assert decision.next_position == 1


def test_completion_sets_output_and_publishes_nothing():
    """Returning from run completes the instance with its output."""
    decision = run(journal("a", "b", "c"), Completed(3, '{"done":1}'))
    assert decision.status is InstanceStatus.COMPLETE
    assert decision.output == '{"done":1}'
    assert decision.entry is None
    assert decision.next_position is None


def test_failed_step_is_recorded_for_the_program_to_handle():
    """A step that fails is journaled as failed; the program sees the error on the next run."""
    decision = run(journal("a"), StepFailed(1, "charge", "card declined"))
    assert decision.entry is not None
    assert decision.entry.kind is EntryKind.STEP_FAILED
    assert decision.entry.value == "card declined"
    assert decision.next_position == 2


def test_workflow_failure_errors_the_instance():
    """A program that gives up errors the instance with its message."""
    decision = run(journal("a", "b"), WorkflowFailed(2, "charge failed: card declined"))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error == "workflow failed: charge failed: card declined"
    assert decision.next_position is None


def test_nondeterminism_names_both_steps():
    """A replayed step whose name differs from the journal's errors the instance naming both."""
    decision = run(journal("reserve", "charge"), Nondeterministic(1, "refund"))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error is not None
    assert "'charge'" in decision.error
    assert "'refund'" in decision.error
    assert "position 1" in decision.error


def test_completing_early_is_nondeterminism():
    """Finishing with fewer steps than the journal holds means the code changed under it."""
    decision = run(journal("a", "b", "c"), Completed(2, "{}"))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error is not None
    assert "finished after 2 steps but the journal holds 3" in decision.error


@pytest.mark.parametrize(
    "outcome",
    [
        StepSucceeded(5, "x", "1"),
        StepSucceeded(0, "x", "1"),
        StepFailed(7, "x", "boom"),
        Completed(9, "{}"),
        Nondeterministic(4, "x"),
    ],
)
def test_outcomes_at_the_wrong_position_are_abi_violations(outcome):
    """A guest reporting a position the journal cannot have errors its instance."""
    decision = run(journal("a", "b"), outcome)
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error is not None
    assert "guest ABI violation" in decision.error
    assert decision.entry is None


def test_crash_fails_the_step_with_the_limit_in_the_message():
    """A trap or breached limit errors the instance with what happened."""
    decision = run(journal("a"), GuestCrashed("CPU limit exceeded: ...", "cpu"))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error == "step at journal position 1 failed: CPU limit exceeded: ..."


def test_admit_runs_a_step_at_the_instance_position():
    """A step message for the current position is admitted."""
    assert admit(step_envelope(2), state(2), created_now=False) == Admit()


def test_admit_recognises_a_redelivered_step_as_duplicate():
    """A step message behind the journal was already handled."""
    assert isinstance(admit(step_envelope(1), state(2), created_now=False), Duplicate)


def test_admit_ignores_steps_of_finished_instances():
    """Nothing runs for a complete instance, even at its position."""
    verdict = admit(step_envelope(3), state(3, InstanceStatus.COMPLETE), created_now=False)
    assert isinstance(verdict, Duplicate)


def test_admit_rejects_a_step_ahead_of_the_journal():
    """A message expecting a future position cannot be legitimate."""
    verdict = admit(step_envelope(5), state(2), created_now=False)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "position-ahead"


def test_admit_rejects_unknown_instances_and_module_mismatch():
    """Step messages for missing instances or another module are dead letters."""
    unknown = admit(step_envelope(0), None, created_now=False)
    assert isinstance(unknown, Reject)
    assert unknown.reason == "unknown-instance"
    other = admit(step_envelope(0, "sha256:" + "b" * 64), state(0), created_now=False)
    assert isinstance(other, Reject)
    assert other.reason == "module-mismatch"


def test_admit_runs_a_create_only_when_it_made_the_instance():
    """The same create twice yields one instance: the second is a duplicate."""
    create = Envelope(MessageKind.CREATE, KEY.tenant, KEY.instance_id, MODULE, CreateBody())
    assert admit(create, state(0), created_now=True) == Admit()
    assert isinstance(admit(create, state(0), created_now=False), Duplicate)
