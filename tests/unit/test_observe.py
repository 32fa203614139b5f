"""The observe room without services: metrics text, the tenant label's bound, which trace a
delivery continues, and traces that cost nothing when they are not configured."""

from __future__ import annotations

import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stepfleet.cycle.tracing import carried, parent_of
from stepfleet.cycle.work import Work
from stepfleet.observe import NO_OBSERVER, BatchCounts, Span
from stepfleet.observe.instruments import Instruments, otlp_traces
from stepfleet.observe.metrics import Metrics
from stepfleet.observe.tracing import Traces
from stepfleet.schemas import (
    CreateBody,
    Envelope,
    EventBody,
    InstanceKey,
    InstanceStatus,
    MessageKind,
    StepBody,
)
from stepfleet.store import InstanceRecord

MODULE = "sha256:" + "a" * 64
SENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STORED = "00-11111111111111111111111111111111-2222222222222222-01"


def _samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(metrics.registry).decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_batch_counts_become_parseable_metrics_with_a_bounded_tenant_label():
    """What a batch counted shows up in the Prometheus text under its names, a listed tenant
    under its own label value and any other as `other`."""
    metrics = Metrics(["acme"])
    label = metrics.tenant
    counts = BatchCounts(
        size=3,
        deliveries={(label("acme"), "step", "ran"): 2, (label("zzz"), "create", "ran"): 1},
        journal={(label("acme"), "step_succeeded"): 2, (label("zzz"), "now"): 1},
        failed_attempts={label("acme"): 1},
        finished={(label("zzz"), "complete"): 1},
        throttled={label("zzz"): 4},
        fuel=[1000, 2_000_000],
        local_steps=2,
    )
    metrics.batch(counts)
    metrics.phase("guest", 0.002)
    metrics.modules(hits=3, misses=1)
    metrics.archived({(label("acme"), "bad-body"): 2})
    metrics.timers_fired([0.01, 0.2])
    metrics.backlog(timers_due=5, outbox_waiting=7)
    found = _samples(metrics)
    assert ({"tenant": "acme", "kind": "step", "outcome": "ran"}, 2.0) in found[
        "stepfleet_deliveries_total"
    ]
    assert ({"tenant": "other", "kind": "create", "outcome": "ran"}, 1.0) in found[
        "stepfleet_deliveries_total"
    ]
    assert ({"tenant": "other", "outcome": "now"}, 1.0) in found["stepfleet_steps_total"]
    assert ({"tenant": "other"}, 4.0) in found["stepfleet_tenant_throttled_total"]
    assert ({"tenant": "acme", "reason": "bad-body"}, 2.0) in found["stepfleet_dead_letters_total"]
    assert ({}, 2.0) in found["stepfleet_guest_fuel_used_count"]
    assert ({}, 2.0) in found["stepfleet_local_steps_total"]
    assert ({"result": "hit"}, 3.0) in found["stepfleet_module_cache_total"]
    assert ({"phase": "guest"}, 1.0) in found["stepfleet_step_phase_seconds_count"]
    assert ({}, 5.0) in found["stepfleet_timers_due"]
    assert ({}, 7.0) in found["stepfleet_outbox_waiting"]
    assert {labels["tenant"] for labels, _ in found["stepfleet_steps_total"]} <= {"acme", "other"}


def _work(kind: MessageKind, sent: str | None, stored: str | None) -> Work[None]:
    body = {
        MessageKind.CREATE: CreateBody(),
        MessageKind.STEP: StepBody(position=1, generation=0),
        MessageKind.EVENT: EventBody(event_id="e", type="t"),
    }[kind]
    work: Work[None] = Work(None, Envelope(kind, "acme", "i-1", MODULE, body, sent))
    if stored is not None or kind is not MessageKind.CREATE:
        work.record = InstanceRecord(
            InstanceKey("acme", "i-1"), MODULE, InstanceStatus.RUNNING, 1, 0, traceparent=stored
        )
    return work


@pytest.mark.parametrize(
    ("kind", "sent", "stored", "parent", "link"),
    [
        pytest.param(MessageKind.CREATE, SENT, None, SENT, None, id="create"),
        pytest.param(MessageKind.CREATE, None, None, None, None, id="create-untraced"),
        pytest.param(MessageKind.STEP, SENT, STORED, SENT, None, id="step-its-own"),
        pytest.param(MessageKind.STEP, None, STORED, STORED, None, id="step-the-row's"),
        pytest.param(MessageKind.EVENT, SENT, STORED, STORED, SENT, id="event-links-producer"),
        pytest.param(MessageKind.EVENT, STORED, STORED, STORED, None, id="event-same"),
        pytest.param(MessageKind.EVENT, SENT, None, SENT, None, id="event-row-untraced"),
    ],
)
def test_which_trace_a_delivery_continues(
    kind: MessageKind, sent: str | None, stored: str | None, parent: str | None, link: str | None
):
    """A delivery continues its message's trace context, else its instance's; an event
    continues the instance's trace and only links its producer's."""
    work = _work(kind, sent, stored)
    assert parent_of(work) == (parent, link)
    assert carried(work) == parent
    work.span = Span(STORED)
    assert carried(work) == STORED


def test_traces_are_off_without_an_endpoint_and_on_with_one():
    """Only the standard OTLP endpoint variables turn traces on; the SDK's own switches turn
    them off again."""
    assert otlp_traces({}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert otlp_traces({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert otlp_traces({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    traces = otlp_traces(endpoint)
    assert isinstance(traces, Traces)
    traces.close()
    assert Instruments().counting is NO_OBSERVER.counting is False
    assert Instruments().tracing is False


def test_a_worker_without_traces_imports_no_opentelemetry():
    """With no OTLP endpoint configured, building a worker imports nothing of OpenTelemetry."""
    code = (
        "import sys\n"
        "from stepfleet.workers.settings import Settings\n"
        "from stepfleet.workers.worker import Worker\n"
        "from stepfleet.store import PgStore\n"
        "from stepfleet.broker import Broker\n"
        "s = Settings(health_file=None, metrics_port=0)\n"
        "w = Worker(s, store=PgStore(s.database_url), broker=Broker(s.amqp_url, s.topology()))\n"
        "print(w.observer.counting, w.observer.tracing,"
        " any(m.startswith('opentelemetry') for m in sys.modules))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.split() == ["True", "False", "False"]
