"""Metrics and traces of a real worker: /metrics parses and agrees with the journal; one
workflow that sleeps and waits for an event is one trace, a span per delivery, in order."""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from stepfleet.broker import Broker
from stepfleet.client import CreateRequest, EventRequest, Producer, create_message
from stepfleet.control import Control
from stepfleet.observe.tracing import DELIVERY_SPAN, Traces
from stepfleet.schemas import EntryKind, InstanceKey, InstanceStatus, digest_of
from stepfleet.store import PgStore
from stepfleet.workers.settings import Settings
from stepfleet.workers.worker import Worker
from tests.integration.conftest import wait_for_status, wait_until

pytestmark = pytest.mark.services

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_PARENT = "00f067aa0ba902b7"


@pytest.fixture
async def run_worker(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Start workers with the given settings and traces; stopped after the test."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(traces: Traces | None = None, **overrides: object) -> Worker:
        worker = Worker(settings.model_copy(update=overrides), name="observed", traces=traces)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 10)
        running.append((worker, task))
        return worker

    yield start
    for worker, _ in running:
        worker.stop()
    for _, task in running:
        await asyncio.wait_for(task, 30)


async def _create(
    settings: Settings, tenant: str, digest: str, ops: list[dict[str, Any]], **extra: Any
) -> InstanceKey:
    instance_id = f"obs-{uuid.uuid4().hex[:12]}"
    async with Producer(settings.amqp_url, settings.topology()) as producer:
        await producer.create(CreateRequest(tenant, digest, {"ops": ops}, instance_id, **extra))
    return InstanceKey(tenant, instance_id)


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The worker's /metrics, parsed by prometheus-client: samples by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        body = answer.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


async def test_metrics_parse_and_match_the_journal(
    run_worker: Callable[..., Any], settings: Settings, store: PgStore, playbook_wasm: bytes
):
    """After a run, the worker's /metrics parses with prometheus-client's parser, and what it
    counted for the tenant (journal rows by kind, finished instances, failed attempts,
    deliveries that ran) is what the database holds; other tenants are counted as `other`."""
    tenant = f"metrics-{uuid.uuid4().hex[:8]}"
    digest = digest_of(playbook_wasm)
    await store.put_module(tenant, digest, playbook_wasm)
    worker = await run_worker(
        metrics_port=0, metrics_host="127.0.0.1", metrics_tenants=f"{tenant}, nobody"
    )
    assert worker.metrics_port
    ops = [
        {"op": "do", "name": "a"},
        {"op": "do", "name": "flaky", "fail_times": 1, "retries": {"limit": 2, "delay_ms": 10}},
        {"op": "sleep", "name": "nap", "ms": 50},
        {"op": "now", "name": "t"},
        {"op": "do", "name": "b"},
    ]
    keys = [await _create(settings, tenant, digest, ops) for _ in range(12)]
    for key in keys:
        found, _ = await wait_for_status(store, key, FINAL, 30)
        assert found.status is InstanceStatus.COMPLETE  # type: ignore[attr-defined]
    async with store._engine.connect() as connection:  # the journal as the database has it
        rows = (
            await connection.execute(
                text("SELECT kind, count(*) FROM journal WHERE tenant = :t GROUP BY kind"),
                {"t": tenant},
            )
        ).all()
        failed = (
            await connection.execute(
                text("SELECT count(*) FROM step_attempts WHERE tenant = :t"), {"t": tenant}
            )
        ).scalar_one()
    journal = {kind: count for kind, count in rows}
    assert sum(journal.values()) == 12 * 5  # a, flaky, slept, now, b

    def counted(samples: dict[str, Any]) -> bool:
        return _total(samples, "stepfleet_steps_total", tenant=tenant) == sum(journal.values())

    samples: dict[str, Any] = {}

    async def settled() -> bool:
        nonlocal samples
        samples = await asyncio.to_thread(_scrape, worker.metrics_port)
        return counted(samples)

    await wait_until(settled, "the metrics to count every journal row", 20)

    for kind, count in journal.items():
        name = EntryKind(kind).name.lower()
        assert _total(samples, "stepfleet_steps_total", tenant=tenant, outcome=name) == count
    assert _total(samples, "stepfleet_failed_attempts_total", tenant=tenant) == failed == 12
    assert (
        _total(samples, "stepfleet_instances_finished_total", tenant=tenant, status="complete")
        == 12
    )
    ran = _total(samples, "stepfleet_deliveries_total", tenant=tenant, outcome="ran")
    # At least the create, the retry's wake and the sleep's wake: the steps in between may
    # be chained to them (cycle/chain.py), and are counted as steps, not deliveries.
    assert ran >= 12 * 3
    assert _total(samples, "stepfleet_deliveries_total", tenant=tenant, kind="create") == 12
    assert _total(samples, "stepfleet_deliveries_total", tenant=tenant, kind="wake") >= 12
    assert not [
        s for s in samples["stepfleet_steps_total"] if s[0]["tenant"] not in (tenant, "other")
    ]
    phases = {labels["phase"] for labels, _ in samples["stepfleet_step_phase_seconds_count"]}
    assert phases == {"inbox", "checks", "transaction", "guest", "publish", "ack"}
    assert _total(samples, "stepfleet_batch_size_count") > 0
    assert _total(samples, "stepfleet_guest_fuel_used_count") >= ran
    assert _total(samples, "stepfleet_module_cache_total", result="miss") >= 1
    assert _total(samples, "stepfleet_module_compile_seconds_count") >= 1
    assert _total(samples, "stepfleet_timer_lateness_seconds_count") >= 12 * 2  # retry, sleep
    for gauge in (
        "stepfleet_http_calls_in_flight",
        "stepfleet_timers_due",
        "stepfleet_outbox_waiting",
        "stepfleet_inbox_deliveries",
    ):
        assert gauge in samples, gauge


def _spans(exporter: InMemorySpanExporter, instance: str) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.name == DELIVERY_SPAN
        and (span.attributes or {}).get("stepfleet.instance") == instance
    ]


async def test_a_workflow_that_sleeps_and_waits_is_one_trace(
    run_worker: Callable[..., Any], settings: Settings, store: PgStore, playbook_wasm: bytes
):
    """With an in-memory exporter, a workflow that takes a step, sleeps, waits for an event
    (sent without a trace context) and takes another step is one trace: the producer's, with
    a span per delivery, each the child of the one before (through local next steps, the
    timer loop's wake and the event), each with its guest run and transaction as children,
    and carrying tenant, instance, module digest, step and attempt."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    await run_worker(traces=Traces(provider))
    tenant = "traced"
    digest = digest_of(playbook_wasm)
    await store.put_module(tenant, digest, playbook_wasm)
    ops = [
        {"op": "do", "name": "a"},
        {"op": "sleep", "name": "nap", "ms": 200},
        {"op": "wait", "name": "approve", "type": "approval", "timeout_ms": 60_000},
        {"op": "do", "name": "b"},
    ]
    key = await _create(
        settings, tenant, digest, ops, traceparent=f"00-{TRACE_ID}-{PRODUCER_PARENT}-01"
    )
    await wait_for_status(store, key, {InstanceStatus.WAITING}, 20)
    async with Producer(settings.amqp_url, settings.topology()) as producer:
        await producer.send_event(EventRequest(tenant, key.instance_id, "approval", {"ok": 1}))
    found, _ = await wait_for_status(store, key, FINAL, 20)
    assert found.status is InstanceStatus.COMPLETE  # type: ignore[attr-defined]
    await wait_until(lambda: len(_spans(exporter, key.instance_id)) >= 5, "five delivery spans")

    spans = sorted(_spans(exporter, key.instance_id), key=lambda s: s.start_time or 0)
    kinds = [(s.attributes or {}).get("stepfleet.kind") for s in spans]
    assert kinds == ["create", "step", "wake", "event", "step"]
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    assert spans[0].parent is not None
    assert spans[0].parent.span_id == int(PRODUCER_PARENT, 16)
    for before, after in itertools.pairwise(spans):
        assert after.parent is not None
        assert after.parent.span_id == before.context.span_id
    for span in spans:
        attributes = span.attributes or {}
        assert attributes["stepfleet.tenant"] == tenant
        assert attributes["stepfleet.module_digest"] == digest
        assert attributes["stepfleet.outcome"] == "ran"
        children = {
            c.name
            for c in exporter.get_finished_spans()
            if c.parent is not None and c.parent.span_id == span.context.span_id
        }
        assert {"stepfleet.guest", "stepfleet.transaction"} <= children
    steps = [(s.attributes or {}).get("stepfleet.step") for s in spans]
    assert steps[:4] == ["a", "nap", "approve", "b"]
    assert all((s.attributes or {}).get("stepfleet.attempt") == 1 for s in spans[:4])


async def test_a_bad_traceparent_starts_a_trace_and_costs_nothing(
    run_worker: Callable[..., Any],
    settings: Settings,
    store: PgStore,
    broker: Broker,
    playbook_wasm: bytes,
):
    """A create whose traceparent is not a W3C trace context runs as usual, in a trace of its
    own that its next delivery continues."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    await run_worker(traces=Traces(provider))
    tenant = "traced"
    digest = digest_of(playbook_wasm)
    await store.put_module(tenant, digest, playbook_wasm)
    instance_id = f"obs-{uuid.uuid4().hex[:12]}"
    ops = [{"op": "do", "name": "a"}, {"op": "do", "name": "b"}]
    _, message = create_message(
        settings.topology(), CreateRequest(tenant, digest, {"ops": ops}, instance_id)
    )
    message.headers["traceparent"] = f"00-{TRACE_ID.upper()}-{PRODUCER_PARENT}-01"
    await broker.publish_many([message])
    found, _ = await wait_for_status(store, InstanceKey(tenant, instance_id), FINAL, 20)
    assert found.status is InstanceStatus.COMPLETE  # type: ignore[attr-defined]
    # The create's delivery, and the local next step's (b and the end, chained).
    await wait_until(lambda: len(_spans(exporter, instance_id)) >= 2, "two delivery spans")
    spans = sorted(_spans(exporter, instance_id), key=lambda s: s.start_time or 0)
    assert spans[0].parent is None
    assert spans[0].context.trace_id != int(TRACE_ID, 16)
    assert {s.context.trace_id for s in spans} == {spans[0].context.trace_id}
    assert spans[1].parent is not None
    assert spans[1].parent.span_id == spans[0].context.span_id


async def test_an_operator_restart_continues_the_instance_trace(
    run_worker: Callable[..., Any],
    settings: Settings,
    store: PgStore,
    control: Control,
    playbook_wasm: bytes,
):
    """The step message an operator action queues carries the trace context the instance row
    keeps: the restarted instance's next delivery is the child of the last one before it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    await run_worker(traces=Traces(provider))
    tenant = "traced"
    digest = digest_of(playbook_wasm)
    await store.put_module(tenant, digest, playbook_wasm)
    ops = [{"op": "do", "name": "a"}, {"op": "sleep", "name": "week", "ms": 7 * 86_400_000}]
    key = await _create(
        settings, tenant, digest, ops, traceparent=f"00-{TRACE_ID}-{PRODUCER_PARENT}-01"
    )
    await wait_for_status(store, key, {InstanceStatus.SLEEPING}, 20)
    await wait_until(lambda: len(_spans(exporter, key.instance_id)) >= 2, "two delivery spans")
    await control.restart(key)
    await wait_until(lambda: len(_spans(exporter, key.instance_id)) >= 4, "four delivery spans")
    spans = sorted(_spans(exporter, key.instance_id), key=lambda s: s.start_time or 0)
    assert [(s.attributes or {}).get("stepfleet.kind") for s in spans[:3]] == [
        "create",
        "step",
        "step",
    ]
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    assert spans[2].parent is not None
    assert spans[2].parent.span_id == spans[1].context.span_id
