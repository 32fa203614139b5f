"""What metrics and traces add to a worker's CPU per delivery, measured without services.

A synthetic batch (64 step deliveries, each with a ran guest and a journal entry) goes
through the end-of-batch hook (`workers/observing.batch_done`) and the phase hooks, with
metrics off, metrics on, and traces on (spans to an in-memory exporter); a scrape of
`/metrics` text is timed too. CPU time (process_time), so the figure holds on a busy machine.
Compare with the CPU a delivery costs a loaded worker (`bench/throughput.py`, phases.cpu).

    python bench/metrics_overhead.py [--batches 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from stepfleet.broker import Delivery
from stepfleet.cycle.phases import PhaseTimes
from stepfleet.cycle.tracing import open_spans
from stepfleet.cycle.work import CycleResult, Ran, Work
from stepfleet.engine import Decision
from stepfleet.observe import NO_OBSERVER, Observer
from stepfleet.observe.instruments import Instruments
from stepfleet.observe.metrics import Metrics
from stepfleet.observe.tracing import Traces
from stepfleet.schemas import (
    EntryKind,
    Envelope,
    GuestReport,
    InstanceStatus,
    JournalEntry,
    MessageKind,
    StepBody,
    StepSucceeded,
)
from stepfleet.workers.observing import batch_done

BATCH = 64
MODULE = "sha256:" + "a" * 64


async def _nothing() -> None:
    return None


def batch(index: int) -> tuple[list[Delivery], list[Work[Delivery]], CycleResult[Delivery]]:
    now = datetime.now(UTC)
    deliveries, works = [], []
    result: CycleResult[Delivery] = CycleResult()
    for i in range(BATCH):
        tenant = f"t{i % 4}"
        headers = {"x-tenant": tenant, "x-instance-id": f"i-{index}-{i}", "x-kind": "step"}
        delivery = Delivery(
            b"{}", headers, f"{tenant}.step", "x", None, None, False, 0, _nothing, _nothing
        )
        envelope = Envelope(
            MessageKind.STEP, tenant, f"i-{index}-{i}", MODULE, StepBody(position=3, generation=0)
        )
        work: Work[Delivery] = Work(delivery, envelope)
        entry = JournalEntry(3, EntryKind.STEP_SUCCEEDED, "charge", "{}", 1, now, now)
        report = GuestReport(StepSucceeded(3, "charge", "{}"), fuel_used=120_000)
        decision = Decision(InstanceStatus.RUNNING, 4, (entry,), publish_step=True)
        result.ran.append(Ran(work, report, now, now, decision))
        deliveries.append(delivery)
        works.append(work)
    result.transaction = (time.monotonic(), time.monotonic())
    return deliveries, works, result


def per_delivery_us(observer: Observer, batches: int) -> float:
    prepared = [batch(i) for i in range(batches)]
    phases = PhaseTimes(observer=observer)
    began = time.process_time()
    for deliveries, works, cycle in prepared:
        now = time.monotonic()
        open_spans(observer, works, now)
        for phase in ("checks", "transaction", "guest", "publish", "ack"):
            phases.add(phase, 0.001)
        observer.phase("inbox", 0.001)
        batch_done(
            observer,
            deliveries,
            works,
            cycle,
            set(),
            local_steps=BATCH,
            began=now,
            published=[now, now],
            acked=[now, now],
        )
    return (time.process_time() - began) / (batches * BATCH) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    metrics = Metrics(["t0"])
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    report = {
        "batch": BATCH,
        "off_us_per_delivery": round(per_delivery_us(NO_OBSERVER, args.batches), 3),
        "metrics_us_per_delivery": round(per_delivery_us(Instruments(metrics), args.batches), 3),
        "traces_us_per_delivery": round(
            per_delivery_us(Instruments(traces=Traces(provider)), args.batches // 10), 3
        ),
    }
    began = time.process_time()
    for _ in range(100):
        size = len(generate_latest(metrics.registry))
    report["scrape_ms"] = round((time.process_time() - began) / 100 * 1000, 3)
    report["scrape_bytes"] = size
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
