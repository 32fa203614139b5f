"""The engine's rules, with no services: admission and the meaning of guest outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from stepfleet.engine import (
    Admit,
    Duplicate,
    EngineLimits,
    InstanceState,
    Keep,
    Reject,
    admit,
    check_size,
    decide,
    resolve_wait,
)
from stepfleet.schemas import (
    Backoff,
    Completed,
    CreateBody,
    EntryFlags,
    EntryKind,
    Envelope,
    ErrorKind,
    EventAwaited,
    EventBody,
    GuestCrashed,
    GuestOutcome,
    GuestReport,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    MessageKind,
    Nondeterministic,
    Recorded,
    RunMode,
    SleepRequested,
    StepBody,
    StepConfig,
    StepFailed,
    StepSucceeded,
    Waiting,
    WaitKind,
    WakeBody,
    WorkflowFailed,
)

KEY = InstanceKey("acme", "order-1")
MODULE = "sha256:" + "a" * 64
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)
LIMITS = EngineLimits()


def journal(*names: str, rollback: str | None = None) -> list[JournalEntry]:
    return [
        JournalEntry(
            seq,
            EntryKind.STEP_SUCCEEDED,
            name,
            f'{{"n":{seq}}}',
            flags=EntryFlags.HAS_ROLLBACK if name == rollback else EntryFlags.NONE,
        )
        for seq, name in enumerate(names)
    ]


def state(position: int, **changes: object) -> InstanceState:
    fields: dict[str, object] = {"status": InstanceStatus.RUNNING, **changes}
    return InstanceState(KEY, MODULE, position=position, **fields)  # type: ignore[arg-type]


def run(
    entries: list[JournalEntry],
    outcome: GuestOutcome,
    *,
    recorded: tuple[Recorded, ...] = (),
    limits: EngineLimits = LIMITS,
    **changes: object,
):
    return decide(
        state(len(entries), **changes),
        entries,
        GuestReport(outcome, recorded),
        started_at=T0,
        finished_at=T1,
        limits=limits,
    )


def envelope(kind: MessageKind, body: object, module: str | None = MODULE) -> Envelope:
    return Envelope(kind, KEY.tenant, KEY.instance_id, module, body)  # type: ignore[arg-type]


def step(position: int, generation: int = 0) -> Envelope:
    return envelope(MessageKind.STEP, StepBody(position=position, generation=generation))


def wake(position: int, attempt: int = 1) -> Envelope:
    return envelope(MessageKind.WAKE, WakeBody(position=position, attempt=attempt))


def event(kind: str = "approval", payload: object = None) -> Envelope:
    body = EventBody(event_id="e1", type=kind, payload=payload)  # type: ignore[arg-type]
    return envelope(MessageKind.EVENT, body, module=None)


def parked(kind: WaitKind, **extra: object) -> Waiting:
    return Waiting(kind, "w", T1, **extra)  # type: ignore[arg-type]


# -- admission ---------------------------------------------------------------------------


def test_create_runs_once():
    """The create that inserted the instance runs it; the same create again does nothing."""
    body = envelope(MessageKind.CREATE, CreateBody())
    assert admit(body, state(0), created_now=True, now=T0) == Admit()
    assert isinstance(admit(body, state(0), created_now=False, now=T0), Duplicate)


@pytest.mark.parametrize(
    ("position", "expected"), [(1, Duplicate), (2, Admit), (3, Reject)], ids=str
)
def test_step_position_decides(position, expected):
    """Behind the journal is a duplicate, at its end runs, ahead of it is refused."""
    assert isinstance(admit(step(position), state(2), created_now=False, now=T0), expected)


@pytest.mark.parametrize(
    "changes",
    [
        {"status": InstanceStatus.PAUSED},
        {"status": InstanceStatus.TERMINATED},
        {"waiting": parked(WaitKind.SLEEP)},
        {"generation": 1},
    ],
    ids=["paused", "terminated", "parked", "restarted"],
)
def test_step_messages_that_must_not_run(changes):
    """Paused, finished, parked or restarted instances ignore a step message for their position."""
    assert isinstance(admit(step(2), state(2, **changes), created_now=False, now=T0), Duplicate)


def test_headers_never_override_the_pinned_module():
    """A create repeated with another module is refused; a step naming an old module runs
    the instance's current one (the row is the truth, e.g. after a module move)."""
    other_module = "sha256:" + "b" * 64
    create = envelope(MessageKind.CREATE, CreateBody(), module=other_module)
    verdict = admit(create, state(0), created_now=False, now=T0)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "module-mismatch"
    stale = envelope(MessageKind.STEP, StepBody(position=0), module=other_module)
    assert admit(stale, state(0), created_now=False, now=T0) == Admit()


def test_unknown_instance_is_refused():
    verdict = admit(step(0), None, created_now=False, now=T0)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "unknown-instance"


def test_wake_for_the_current_timer_ends_the_wait():
    """A wake with the instance's position and attempt runs it; a stale one does nothing."""
    retrying = state(2, attempt=3, waiting=parked(WaitKind.RETRY))
    assert admit(wake(2, attempt=3), retrying, created_now=False, now=T0) == Admit(woken=True)
    assert isinstance(admit(wake(2, attempt=2), retrying, created_now=False, now=T0), Duplicate)
    assert isinstance(admit(wake(2), state(2), created_now=False, now=T0), Duplicate)


def test_wake_of_an_event_wait_records_the_timeout():
    """An event wait whose timer fires gets a timeout entry the program can handle."""
    waiting = state(4, waiting=parked(WaitKind.EVENT, event_type="approval", timeout_ms=500))
    verdict = admit(wake(4), waiting, created_now=False, now=T1)
    assert isinstance(verdict, Admit)
    assert verdict.resolution == JournalEntry(
        4,
        EntryKind.EVENT_TIMED_OUT,
        "w",
        "wait 'w' for event 'approval' timed out after 500 ms",
        1,
        T1,
        T1,
    )


def test_event_for_the_current_wait_is_delivered():
    waiting = state(4, waiting=parked(WaitKind.EVENT, event_type="approval"))
    verdict = admit(event(payload={"ok": True}), waiting, created_now=False, now=T1)
    assert isinstance(verdict, Admit)
    assert verdict.resolution is not None
    assert (verdict.resolution.kind, verdict.resolution.value) == (
        EntryKind.EVENT_RECEIVED,
        '{"ok":true}',
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"waiting": parked(WaitKind.EVENT, event_type="other")},
        {"waiting": parked(WaitKind.SLEEP)},
        {"status": InstanceStatus.PAUSED, "waiting": parked(WaitKind.EVENT, event_type="approval")},
    ],
    ids=["running", "other-type", "sleeping", "paused"],
)
def test_event_nobody_waits_for_yet_is_kept(changes):
    """An event that arrives before its wait is stored for it."""
    assert admit(event(), state(2, **changes), created_now=False, now=T0) == Keep()


def test_event_for_a_finished_instance_is_refused():
    verdict = admit(event(), state(2, status=InstanceStatus.COMPLETE), created_now=False, now=T0)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "instance-finished"
    assert "complete" in verdict.detail


def test_size_limits_are_refused_with_their_numbers():
    assert check_size("params", "x" * 10, 10) is None
    refused = check_size("params", "x" * 11, 10)
    assert refused == Reject("over-limit", "params are 11 bytes, the limit is 10")


# -- steps -------------------------------------------------------------------------------


def test_new_step_is_recorded_at_the_journal_end_and_goes_on():
    decision = run(journal("reserve"), StepSucceeded(1, "charge", '{"ok":true}'))
    assert decision.status is InstanceStatus.RUNNING
    assert decision.entries == (
        JournalEntry(1, EntryKind.STEP_SUCCEEDED, "charge", '{"ok":true}', 1, T0, T1),
    )
    assert (decision.position, decision.publish_step, decision.attempt) == (2, True, 1)


def test_completion_sets_output_and_publishes_nothing():
    decision = run(journal("a", "b", "c"), Completed(3, '{"done":1}'))
    assert decision.status is InstanceStatus.COMPLETE
    assert decision.output == '{"done":1}'
    assert (decision.entries, decision.publish_step) == ((), False)


def test_recorded_values_come_before_the_outcome():
    """now and random take journal positions ahead of the step that follows them."""
    recorded = (Recorded(1, EntryKind.NOW, "1700"), Recorded(2, EntryKind.RANDOM, "ab"))
    decision = run(journal("a"), StepSucceeded(3, "b", "1"), recorded=recorded)
    kinds = [(e.seq, e.kind) for e in decision.entries]
    assert kinds == [(1, EntryKind.NOW), (2, EntryKind.RANDOM), (3, EntryKind.STEP_SUCCEEDED)]
    assert decision.position == 4


def test_nondeterminism_names_both_operations():
    decision = run(journal("reserve", "charge"), Nondeterministic(1, "refund", op=2))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error == (
        "nondeterminism at journal position 1: the journal has step 'charge' "
        "but the workflow asked for sleep 'refund'"
    )
    assert decision.error_kind is ErrorKind.NONDETERMINISM


def test_finishing_before_the_journal_ends_is_nondeterminism():
    decision = run(journal("a", "b"), Completed(1, "{}"))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error is not None
    assert decision.error.startswith("nondeterminism")
    assert decision.error_kind is ErrorKind.NONDETERMINISM


def test_nondeterminism_reported_past_the_journal_is_an_abi_violation():
    decision = run(journal("a"), Nondeterministic(7, "b"))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error_kind is ErrorKind.ABI_VIOLATION
    assert (decision.error or "").startswith("guest ABI violation: nondeterminism reported")


def test_outcome_at_the_wrong_position_is_an_abi_violation():
    decision = run(journal("a"), StepSucceeded(5, "b", "1"))
    assert decision.status is InstanceStatus.ERRORED
    assert "guest ABI violation" in (decision.error or "")
    assert decision.error_kind is ErrorKind.ABI_VIOLATION
    assert decision.entries == ()


def test_crash_outside_a_step_errors_the_instance():
    """The error says what failed, as the sandbox saw it; without that, where the run stood."""
    between = "the workflow code failed between steps, at journal position 1"
    decision = run(journal("a"), GuestCrashed("guest trapped: unreachable", where=between))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error == f"{between}: guest trapped: unreachable"
    assert decision.error_kind is ErrorKind.CRASHED
    unplaced = run(journal("a"), GuestCrashed("host error: KeyError"))
    assert unplaced.error == "the run failed at journal position 1: host error: KeyError"


# -- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        (Backoff.CONSTANT, [100, 100, 100]),
        (Backoff.LINEAR, [100, 200, 300]),
        (Backoff.EXPONENTIAL, [100, 200, 400]),
    ],
)
def test_each_retry_is_a_timer_with_its_backoff(backoff, delays):
    """A failed attempt parks the instance until its backoff delay; nothing is recorded."""
    config = StepConfig(retry_limit=3, retry_delay_ms=100, backoff=backoff)
    for attempt, delay in enumerate(delays, start=1):
        decision = run(journal("a"), StepFailed(1, "b", "boom", config=config), attempt=attempt)
        assert decision.status is InstanceStatus.RUNNING
        assert decision.entries == ()
        assert decision.attempt == attempt + 1
        assert decision.waiting == Waiting(WaitKind.RETRY, "b", T1 + timedelta(milliseconds=delay))
        assert decision.failed_attempt is not None
        assert (decision.failed_attempt.attempt, decision.failed_attempt.error) == (
            attempt,
            "boom",
        )


def test_retries_exhausted_record_the_failure_for_the_program():
    config = StepConfig(retry_limit=3, retry_delay_ms=100)
    decision = run(journal("a"), StepFailed(1, "b", "boom", config=config), attempt=4)
    assert decision.entries == (JournalEntry(1, EntryKind.STEP_FAILED, "b", "boom", 4, T0, T1),)
    assert (decision.status, decision.publish_step, decision.waiting) == (
        InstanceStatus.RUNNING,
        True,
        None,
    )


def test_a_recovered_step_records_the_attempt_that_succeeded():
    decision = run(journal("a"), StepSucceeded(1, "b", "1"), attempt=3)
    assert decision.entries[0].attempt == 3
    assert decision.attempt == 1


def test_non_retryable_failure_is_final_at_once():
    decision = run(journal("a"), StepFailed(1, "b", "no", non_retryable=True))
    assert decision.entries[0].kind is EntryKind.STEP_FAILED
    assert decision.entries[0].attempt == 1
    assert decision.failed_attempt is None


def test_retry_without_delay_runs_again_at_once():
    config = StepConfig(retry_limit=1, retry_delay_ms=0)
    decision = run(journal(), StepFailed(0, "b", "boom", config=config))
    assert (decision.waiting, decision.publish_step, decision.attempt) == (None, True, 2)


def test_default_retry_policy_matches_the_documented_defaults():
    config = StepConfig()
    assert (config.retry_limit, config.retry_delay_ms, config.backoff, config.timeout_ms) == (
        5,
        10_000,
        Backoff.EXPONENTIAL,
        600_000,
    )


# -- sleeps and waits --------------------------------------------------------------------


def test_sleep_records_its_wake_time_and_parks():
    decision = run(journal("a"), SleepRequested(1, "nap", 5000))
    due = T1 + timedelta(seconds=5)
    assert decision.status is InstanceStatus.SLEEPING
    assert decision.entries[0].kind is EntryKind.SLEPT
    assert decision.entries[0].value == str(int(due.timestamp() * 1000))
    assert decision.waiting == Waiting(WaitKind.SLEEP, "nap", due)
    assert decision.position == 2
    assert not decision.publish_step


def test_sleep_until_a_past_time_goes_on_at_once():
    past_ms = int((T0 - timedelta(days=1)).timestamp() * 1000)
    decision = run(journal(), SleepRequested(0, "late", past_ms, absolute=True))
    assert (decision.status, decision.publish_step, decision.waiting) == (
        InstanceStatus.RUNNING,
        True,
        None,
    )


def test_sleep_over_the_limit_is_refused_with_its_numbers():
    limits = EngineLimits(max_sleep_ms=1000)
    decision = run(journal(), SleepRequested(0, "long", 1001), limits=limits)
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error == "sleep 'long' of 1001 ms is over the limit of 1000 ms"
    assert decision.error_kind is ErrorKind.LIMIT


def test_wait_parks_with_the_default_timeout():
    decision = run(journal("a"), EventAwaited(1, "approve", "approval"))
    assert decision.status is InstanceStatus.WAITING
    assert decision.waiting == Waiting(
        WaitKind.EVENT,
        "approve",
        T1 + timedelta(milliseconds=LIMITS.default_event_timeout_ms),
        "approval",
        LIMITS.default_event_timeout_ms,
    )
    assert decision.position == 1


def test_wait_over_the_limit_is_refused():
    decision = run(
        journal(), EventAwaited(0, "w", "t", 2000), limits=EngineLimits(max_sleep_ms=1000)
    )
    assert decision.status is InstanceStatus.ERRORED
    assert "over the limit of 1000 ms" in (decision.error or "")
    assert decision.error_kind is ErrorKind.LIMIT


def test_an_event_already_stored_ends_a_new_wait():
    decision = run(journal("a"), EventAwaited(1, "approve", "approval"))
    resolved = resolve_wait(decision, '{"ok":1}', T1, LIMITS)
    assert resolved.status is InstanceStatus.RUNNING
    assert resolved.waiting is None
    assert resolved.entries[-1] == JournalEntry(
        1, EntryKind.EVENT_RECEIVED, "approve", '{"ok":1}', 1, T1, T1
    )
    assert (resolved.position, resolved.publish_step) == (2, True)
    assert resolved.error_kind is None


def test_an_event_past_the_state_limit_errors_the_wait():
    decision = run(journal("a"), EventAwaited(1, "approve", "approval"))
    limits = EngineLimits(max_state_bytes=decision.state_bytes + 4)
    resolved = resolve_wait(decision, '"too long"', T1, limits)
    assert resolved.status is InstanceStatus.ERRORED
    assert resolved.error_kind is ErrorKind.LIMIT


# -- compensations -----------------------------------------------------------------------


def test_failing_with_a_rollback_starts_compensating():
    decision = run(journal("reserve", "charge", rollback="reserve"), WorkflowFailed(2, "no"))
    assert decision.status is InstanceStatus.RUNNING
    assert decision.mode is RunMode.COMPENSATE
    assert decision.end_status is InstanceStatus.ERRORED
    assert decision.error == "workflow failed: no"
    assert decision.error_kind is ErrorKind.WORKFLOW_FAILED
    assert decision.publish_step


def test_failing_without_rollbacks_errors_at_once():
    decision = run(journal("reserve"), WorkflowFailed(1, "no"))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.mode is RunMode.FORWARD
    assert decision.error_kind is ErrorKind.WORKFLOW_FAILED


def compensating(entries: list[JournalEntry], outcome: GuestOutcome, **changes: object):
    fields: dict[str, object] = {
        "mode": RunMode.COMPENSATE,
        "end_status": InstanceStatus.ERRORED,
        "error": "workflow failed: no",
        **changes,
    }
    return run(entries, outcome, **fields)


def test_a_compensation_is_recorded_and_the_next_one_follows():
    outcome = StepSucceeded(2, "reserve", '{"released":1}', EntryFlags.COMPENSATION)
    decision = compensating(journal("reserve", "charge", rollback="reserve"), outcome)
    assert decision.entries[0].kind is EntryKind.COMPENSATED
    assert (decision.status, decision.mode, decision.publish_step) == (
        InstanceStatus.RUNNING,
        RunMode.COMPENSATE,
        True,
    )
    assert decision.error == "workflow failed: no"
    # The error is an earlier run's: this run errored nothing.
    assert decision.error_kind is None


def test_compensations_done_end_in_the_status_they_were_started_for():
    done = compensating(journal("reserve"), Completed(1, "null"))
    assert (done.status, done.error) == (InstanceStatus.ERRORED, "workflow failed: no")
    terminated = compensating(
        journal("reserve"), Completed(1, "null"), end_status=InstanceStatus.TERMINATED
    )
    assert terminated.status is InstanceStatus.TERMINATED


def test_a_compensation_failing_for_good_says_which():
    failed = StepFailed(1, "reserve", "warehouse down", non_retryable=True)
    decision = compensating(journal("reserve"), failed)
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error == (
        "workflow failed: no; compensation of step 'reserve' failed after 1 attempt(s): "
        "warehouse down"
    )
    assert decision.error_kind is ErrorKind.COMPENSATION_FAILED


def test_a_compensation_in_forward_mode_is_an_abi_violation():
    outcome = StepSucceeded(1, "x", "1", EntryFlags.COMPENSATION)
    decision = run(journal("a"), outcome)
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error_kind is ErrorKind.ABI_VIOLATION


# -- limits ------------------------------------------------------------------------------


def test_step_limit_stops_the_instance_without_recording():
    decision = run(journal("a", "b"), StepSucceeded(2, "c", "1"), limits=EngineLimits(max_steps=2))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error == "the instance reached its limit of 2 journal entries"
    assert decision.error_kind is ErrorKind.LIMIT
    assert (decision.entries, decision.position) == ((), 2)


def test_state_limit_stops_the_instance_without_recording():
    limits = EngineLimits(max_state_bytes=100)
    decision = run(journal(), StepSucceeded(0, "big", '"' + "x" * 200 + '"'), limits=limits)
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error is not None
    assert "the limit is 100" in decision.error
    assert decision.error_kind is ErrorKind.LIMIT
    assert decision.entries == ()
