"""Step logs carry the tenant, instance, module digest, step and attempt."""

from __future__ import annotations

from datetime import UTC, datetime

from stepfleet.cycle.guest import log_run
from stepfleet.cycle.replays import CachedReplay
from stepfleet.cycle.work import Ran, Work
from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import ReplayJournal
from stepfleet.schemas import (
    Envelope,
    GuestOutcome,
    GuestReport,
    InstanceKey,
    InstanceStatus,
    MessageKind,
    StepBody,
    StepFailed,
    StepSucceeded,
)
from stepfleet.store import InstanceRecord
from tests.conftest import capture_logs

MODULE = "sha256:" + "c" * 64


def decide_logged(outcome: GuestOutcome, attempt: int = 1) -> list[dict[str, object]]:
    """Run the cycle's decide-and-log stage for one message; return the captured events."""
    key = InstanceKey("acme", "i-1")
    work = Work(
        handle=None,
        envelope=Envelope(MessageKind.STEP, "acme", "i-1", MODULE, StepBody(position=0)),
        record=InstanceRecord(key, MODULE, InstanceStatus.RUNNING, 0, 0, attempt=attempt),
        state=InstanceState(key, MODULE, InstanceStatus.RUNNING, 0, attempt=attempt),
        replay=CachedReplay(0, "{}", ReplayJournal()),
    )
    now = datetime.now(UTC)
    item = Ran(work, GuestReport(outcome, (), [(1, "hello from the guest")]), now, now)
    assert work.state is not None
    assert work.replay is not None
    item.decision = decide(
        work.state, [], item.report, started_at=now, finished_at=now, limits=EngineLimits()
    )
    with capture_logs() as logs:
        log_run(item)
    return logs


def test_step_recorded_event_has_the_delivery_context():
    """The per-step log event names tenant, instance, module digest, step and attempt."""
    logs = decide_logged(StepSucceeded(0, "charge", "{}"))
    recorded = next(e for e in logs if e["event"] == "step_recorded")
    assert recorded["tenant"] == "acme"
    assert recorded["instance"] == "i-1"
    assert recorded["module_digest"] == MODULE
    assert recorded["step"] == "charge"
    assert recorded["attempt"] == 1
    guest = next(e for e in logs if e["event"] == "guest_log")
    assert guest["message"] == "hello from the guest"
    assert guest["tenant"] == "acme"


def test_failed_attempt_event_names_the_step_attempt_and_retry():
    """A retried attempt is logged with its step, attempt number, error and retry time."""
    logs = decide_logged(StepFailed(0, "charge", "card declined"), attempt=2)
    failed = next(e for e in logs if e["event"] == "step_attempt_failed")
    assert (failed["step"], failed["attempt"], failed["error"]) == ("charge", 2, "card declined")
    assert failed["module_digest"] == MODULE
    assert failed["retry_at"] != "now"
