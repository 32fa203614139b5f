"""Which dead letters stall their instance, and the stall sweep's settings, without services."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stepfleet.broker import Topology
from stepfleet.engine import due_us
from stepfleet.schemas import InstanceKey, InstanceStatus, Waiting, WaitKind
from stepfleet.store import InstanceRecord, NewDeadLetter
from stepfleet.workers import health
from stepfleet.workers.archive import DeadLetterArchiver
from stepfleet.workers.dead_letter_records import ArchivePolicy
from stepfleet.workers.settings import Settings

TOPOLOGY = Topology("unit")
KEY = InstanceKey("acme", "order-1")
MODULE = "sha256:" + "a" * 64
WAKE_AT = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)


def _archiver() -> DeadLetterArchiver:
    policy = ArchivePolicy(
        topology=TOPOLOGY,
        fleet_user="fleet",
        trusted_users=frozenset({"fleet"}),
        max_body_bytes=1 << 20,
        account_bytes=None,
    )
    return DeadLetterArchiver(store=None, policy=policy)  # type: ignore[arg-type]


def _letter(kind: str, fields_of_body: dict[str, Any], **changes: Any) -> NewDeadLetter:
    headers = {
        "x-tenant": KEY.tenant,
        "x-instance-id": KEY.instance_id,
        "x-kind": kind,
        "x-schema-version": "1",
        "x-dead-reason": "unprocessable",
    }
    fields: dict[str, Any] = {
        "letter_key": "k",
        "reason": "delivery-limit",
        "detail": "",
        "routing_key": f"acme.{kind}",
        "headers": headers,
        "body": json.dumps({"version": 1, **fields_of_body}).encode(),
        "tenant": KEY.tenant,
        "instance_id": KEY.instance_id,
        "kind": kind,
        "source": "rabbitmq",
        "sender": "fleet",
        "first_exchange": TOPOLOGY.internal_exchange,
        **changes,
    }
    return NewDeadLetter(**fields)


def _running(position: int = 2, generation: int = 0, **changes: Any) -> InstanceRecord:
    fields: dict[str, Any] = {
        "key": KEY,
        "module": MODULE,
        "status": InstanceStatus.RUNNING,
        "position": position,
        "generation": generation,
        **changes,
    }
    return InstanceRecord(**fields)


def _sleeping() -> InstanceRecord:
    return _running(
        status=InstanceStatus.SLEEPING,
        attempt=1,
        waiting=Waiting(WaitKind.SLEEP, "nap", WAKE_AT),
    )


WAKE = {"position": 2, "attempt": 1, "due_us": due_us(WAKE_AT)}


@pytest.mark.parametrize(
    ("letter", "instance", "stalls"),
    [
        pytest.param(_letter("step", {"position": 2}), _running(), True, id="current-step"),
        pytest.param(_letter("step", {"position": 1}), _running(), False, id="stale-step"),
        pytest.param(_letter("step", {"position": 3}), _running(), False, id="step-ahead"),
        pytest.param(
            _letter("step", {"position": 2}), _running(generation=1), False, id="before-restart"
        ),
        pytest.param(
            _letter("step", {"position": 2}),
            _running(status=InstanceStatus.PAUSED),
            False,
            id="paused",
        ),
        pytest.param(
            _letter("step", {"position": 2}),
            _running(status=InstanceStatus.COMPLETE),
            False,
            id="finished",
        ),
        pytest.param(_letter("step", {"position": 2}), _sleeping(), False, id="step-while-asleep"),
        pytest.param(_letter("wake", WAKE), _sleeping(), True, id="current-wake"),
        pytest.param(
            _letter("wake", {**WAKE, "due_us": WAKE["due_us"] - 1}),
            _sleeping(),
            False,
            id="earlier-timer",
        ),
        pytest.param(
            _letter("wake", {**WAKE, "attempt": 2}), _sleeping(), False, id="other-attempt"
        ),
        pytest.param(
            _letter("step", {"position": 2}, first_exchange=TOPOLOGY.ingress_exchange),
            _running(),
            False,
            id="from-a-producer",
        ),
        pytest.param(
            _letter("step", {"position": 2}, first_exchange=None),
            _running(),
            False,
            id="not-vouched-for",
        ),
        pytest.param(
            _letter("step", {"position": 2}, body=b"{not json"), _running(), False, id="bad-body"
        ),
        pytest.param(
            _letter("step", {"position": 2}),
            _running(key=InstanceKey("acme", "order-2")),
            False,
            id="other-instance",
        ),
    ],
)
def test_only_a_fleet_letter_for_where_the_instance_stands_stalls_it(
    letter: NewDeadLetter, instance: InstanceRecord, stalls: bool
):
    """A step or wake from the internal exchange that the engine would run now marks its
    instance; a stale, early or foreign copy, or one for a paused or finished instance, never."""
    assert _archiver()._stalls(letter, instance) is stalls


def test_the_sweep_threshold_must_exceed_the_outbox_relay():
    """An instance with an outbox row is the relay's: the sweep's threshold is refused unless
    it is longer than the relay's."""
    with pytest.raises(ValidationError, match="must be more than outbox_relay_after_seconds"):
        Settings(stall_after_seconds=10, outbox_relay_after_seconds=10)
    assert Settings(stall_after_seconds=11, outbox_relay_after_seconds=10).stall_after_seconds == 11


@pytest.mark.parametrize(("after", "every"), [(300, 60.0), (40, 10.0), (1, 0.5)])
def test_the_sweep_runs_every_quarter_of_its_threshold_within_bounds(after: float, every: float):
    """A sweep every quarter of the threshold, at least every minute, at most twice a second."""
    settings = Settings(stall_after_seconds=after, outbox_relay_after_seconds=0.5)
    assert settings.stall_sweep_seconds == every


def test_health_reports_sweeps_and_stalls(tmp_path: Path):
    """The health file carries the sweep's and the archiver's counts, and `stepfleet health`
    prints them."""
    path = tmp_path / "worker.health"
    report = health.Health(pid=1, name="w", state="ready", stalls_swept=3, instances_stalled=2)
    report.store_ok_at = report.broker_ok_at = datetime.now(UTC).timestamp()
    health.write(path, report)
    assert json.loads(path.read_text())["stalls_swept"] == 3
    ok, line = health.judge(path, max_age=15)
    assert ok, line
    assert "3 unmoved instances republished, 2 marked stalled" in line
