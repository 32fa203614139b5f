"""Step logs carry the tenant, instance, module digest, step and attempt."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from stepfleet.sandbox import ReplayJournal
from stepfleet.schemas import (
    Envelope,
    InstanceKey,
    InstanceStatus,
    MessageKind,
    StepBody,
    StepSucceeded,
)
from stepfleet.store import InstanceRecord
from stepfleet.workers.batch import BatchProcessor, _Ran, _Work
from stepfleet.workers.replay_cache import CachedReplay

MODULE = "sha256:" + "c" * 64


def test_step_recorded_event_has_the_delivery_context():
    """The per-step log event names tenant, instance, module digest, step and attempt."""
    key = InstanceKey("acme", "i-1")
    work = _Work(
        delivery=None,  # type: ignore[arg-type]
        envelope=Envelope(MessageKind.STEP, "acme", "i-1", MODULE, StepBody(position=0)),
        key=key,
        record=InstanceRecord(key, MODULE, InstanceStatus.RUNNING, 0, 0),
        replay=CachedReplay(0, "{}", ReplayJournal()),
    )
    now = datetime.now(UTC)
    item = _Ran(work, StepSucceeded(0, "charge", "{}"), [(1, "hello from the guest")], now, now)
    processor = BatchProcessor.__new__(BatchProcessor)
    with structlog.testing.capture_logs() as logs:
        decision = processor._decide(item)
    assert decision.entry is not None
    recorded = next(e for e in logs if e["event"] == "step_recorded")
    assert recorded["tenant"] == "acme"
    assert recorded["instance"] == "i-1"
    assert recorded["module_digest"] == MODULE
    assert recorded["step"] == "charge"
    assert recorded["attempt"] == 1
    guest = next(e for e in logs if e["event"] == "guest_log")
    assert guest["message"] == "hello from the guest"
    assert guest["tenant"] == "acme"
