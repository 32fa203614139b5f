"""Fairness: tenant B's latency while tenant A floods the fleet, against an idle fleet.

Tenant A publishes 20,000 steps (three-step order workflows) at once; right after, tenant B
publishes 50 three-step workflows. Prints B's create-to-complete p50/p99 under the flood and on
an idle fleet, and their ratio, as JSON. B's creates and steps are placed in other lanes than
A's (lanes follow the routing key `<tenant>.<kind>`); `--same-lane` measures the unlucky case of
a shared lane, and
`--flooder-rate N` gives A a steps-per-second limit, the remedy for it.

    python bench/fairness.py [--flood-steps 20000] [--workers 2] [--same-lane] [--flooder-rate N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, text

from stepfleet.broker import Broker, Outgoing, Topology
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import TenantLimits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, bench_deployment
from throughput import ORDER, percentile, start_workers, stop_workers


async def lanes_of(broker: Broker, topology: Topology, tenant: str) -> set[int]:
    """The lanes a tenant's creates and steps land in (placed by routing key)."""
    lanes = set()
    for kind in ("create", "step"):
        internal = kind == "step"
        probe = uuid.uuid4().hex
        exchange = topology.internal_exchange if internal else topology.ingress_exchange
        headers = {"x-tenant": tenant, "x-kind": kind}
        user = None if internal else "guest"
        await broker.publish_many(
            [Outgoing(exchange, f"{tenant}.{kind}", b"{}", headers, probe, user)]
        )
        lanes.add(await _find(broker, topology, probe))
    return lanes


async def _find(broker: Broker, topology: Topology, probe: str) -> int:
    while True:
        for lane, queue in enumerate(topology.work_queues):
            for delivery in await broker.fetch(queue, limit=100):
                await delivery.ack()
                if delivery.message_id == probe:
                    return lane
        await asyncio.sleep(0.05)


async def latencies(url: str, tenant: str, published: dict[str, datetime]) -> list[float]:
    engine = create_engine(url)
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    text(
                        "SELECT id, updated_at FROM instances WHERE tenant = :t "
                        "AND status = 'complete' AND id = ANY(:ids)"
                    ),
                    {"t": tenant, "ids": list(published)},
                ).all()
            if len(rows) == len(published):
                return [(r.updated_at - published[r.id]).total_seconds() * 1000 for r in rows]
            await asyncio.sleep(0.05)
    finally:
        engine.dispose()


async def run_b(producer: Producer, url: str, tenant: str, digest: str) -> list[float]:
    published: dict[str, datetime] = {}
    requests = [
        CreateRequest(tenant, digest, {"order_id": f"B-{i}", "amount": 1}, f"b-{uuid.uuid4().hex}")
        for i in range(50)
    ]
    now = datetime.now(UTC)
    await producer.create_batch(requests)
    for request in requests:
        assert request.instance_id is not None
        published[request.instance_id] = now
    return await latencies(url, tenant, published)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood-steps", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--same-lane", action="store_true")
    parser.add_argument("--flooder-rate", type=float, help="give tenant A a steps-per-second limit")
    args = parser.parse_args()

    async with bench_deployment(ORDER) as deployment:
        topology, digest, url = deployment.topology, deployment.digest, deployment.url
        flooder = "flood"
        lanes = await lanes_of(deployment.broker, topology, flooder)
        calm = "calm0"
        for attempt in range(100):
            calm = f"calm{attempt}"
            shared = bool(await lanes_of(deployment.broker, topology, calm) & lanes)
            if shared == args.same_lane:
                break
        await deployment.push(flooder, calm)
        if args.flooder_rate:
            await deployment.limit(flooder, TenantLimits(steps_per_second=args.flooder_rate))
        workers = start_workers(args.workers, deployment.env)
        try:
            async with Producer(AMQP, topology) as producer:
                await run_b(producer, url, calm, digest)  # warm: connections, compiled module
                idle = await run_b(producer, url, calm, digest)
                flood = [
                    CreateRequest(flooder, digest, {"order_id": f"A-{i}", "amount": 1}, f"a-{i}")
                    for i in range(args.flood_steps // 3)
                ]
                for offset in range(0, len(flood), 1000):
                    await producer.create_batch(flood[offset : offset + 1000])
                loaded = await run_b(producer, url, calm, digest)
            engine = create_engine(url)
            with engine.connect() as connection:
                flood_done = connection.execute(
                    text(
                        "SELECT count(*) FROM instances "
                        "WHERE tenant = 'flood' AND status = 'complete'"
                    )
                ).scalar_one()
            engine.dispose()
        finally:
            stop_workers(workers)
    idle_ms = {"p50": round(percentile(idle, 0.5), 1), "p99": round(percentile(idle, 0.99), 1)}
    flood_ms = {
        "p50": round(percentile(loaded, 0.5), 1),
        "p99": round(percentile(loaded, 0.99), 1),
    }
    report = {
        "workers": args.workers,
        "lanes": topology.lanes,
        "same_lane": args.same_lane,
        "flooder_steps_per_second": args.flooder_rate,
        "flood_steps": len(flood) * 3,
        "flood_workflows_complete_when_b_done": flood_done,
        "b_idle_ms": idle_ms,
        "b_flood_ms": flood_ms,
        "ratio_p50": round(flood_ms["p50"] / idle_ms["p50"], 2),
        "ratio_p99": round(flood_ms["p99"] / idle_ms["p99"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
