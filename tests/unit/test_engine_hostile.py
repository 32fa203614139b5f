"""Whatever a guest reports, `decide` returns a decision: hostile values never raise.

A raise here used to fail the worker's whole batch, other tenants' deliveries with it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.schemas import (
    Completed,
    EntryKind,
    EventAwaited,
    GuestCrashed,
    GuestOutcome,
    GuestReport,
    InstanceKey,
    InstanceStatus,
    SleepRequested,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
)

KEY = InstanceKey("acme", "order-1")
MODULE = "sha256:" + "a" * 64
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = EngineLimits()
I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(max_size=20)


def _decide(outcome: GuestOutcome):  # type: ignore[no-untyped-def]
    state = InstanceState(KEY, MODULE, status=InstanceStatus.RUNNING, position=0)
    return decide(
        state,
        [],
        GuestReport(outcome),
        started_at=T0,
        finished_at=T0 + timedelta(milliseconds=5),
        limits=LIMITS,
    )


def test_a_sleep_of_i64_max_milliseconds_errors_the_instance_over_the_limit() -> None:
    decision = _decide(SleepRequested(0, "forever", 2**63 - 1))
    assert decision.status is InstanceStatus.ERRORED
    assert decision.error is not None
    assert "over the limit" in decision.error


def test_a_sleep_until_i64_max_errors_and_one_until_i64_min_goes_on() -> None:
    late = _decide(SleepRequested(0, "later", 2**63 - 1, absolute=True))
    assert late.status is InstanceStatus.ERRORED
    assert late.error is not None
    assert "over the limit" in late.error
    early = _decide(SleepRequested(0, "long-ago", -(2**63), absolute=True))
    assert early.status is InstanceStatus.RUNNING
    assert early.publish_step
    assert early.entries[0].kind is EntryKind.SLEPT
    assert early.entries[0].value == "0"


def test_a_wait_with_a_huge_negative_timeout_times_out_at_once() -> None:
    decision = _decide(EventAwaited(0, "ack", "x", -(2**63)))
    assert decision.status is InstanceStatus.WAITING
    assert decision.waiting is not None
    assert decision.waiting.wake_at <= T0 + timedelta(seconds=1)


def test_nul_in_a_name_errors_the_instance_and_nul_in_a_message_is_replaced() -> None:
    named = _decide(StepSucceeded(0, "a\x00b", "{}"))
    assert named.status is InstanceStatus.ERRORED
    assert named.error is not None
    assert "NUL" in named.error
    valued = _decide(StepSucceeded(0, "charge", '"\x00"'))
    assert valued.status is InstanceStatus.ERRORED
    assert valued.error is not None
    assert "contains NUL" in valued.error
    failed = _decide(WorkflowFailed(0, "bad\x00input"))
    assert failed.error == "workflow failed: bad\ufffdinput"
    step = _decide(StepFailed(0, "charge", "card\x00declined", non_retryable=True))
    assert all("\x00" not in e.value for e in step.entries)


OUTCOMES = st.one_of(
    st.builds(StepSucceeded, st.integers(-2, 3), TEXT, TEXT),
    st.builds(StepFailed, st.integers(-2, 3), TEXT, TEXT, st.booleans()),
    st.builds(SleepRequested, st.integers(-2, 3), TEXT, I64, st.booleans()),
    st.builds(EventAwaited, st.integers(-2, 3), TEXT, TEXT, st.none() | I64),
    st.builds(Completed, st.integers(-2, 3), TEXT),
    st.builds(WorkflowFailed, st.integers(-2, 3), TEXT),
    st.builds(GuestCrashed, TEXT),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(OUTCOMES)
def test_decide_never_raises_and_never_records_nul(outcome: GuestOutcome) -> None:
    decision = _decide(outcome)
    assert decision.position >= 0
    texts = [decision.error or "", *(e.name + e.value for e in decision.entries)]
    if decision.failed_attempt is not None:
        texts.append(decision.failed_attempt.error + decision.failed_attempt.name)
    assert all("\x00" not in text for text in texts)
