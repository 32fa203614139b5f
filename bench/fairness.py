"""Fairness: tenant B's latency while tenant A floods the fleet, against an idle fleet.

Tenant A publishes 20,000 steps (three-step order workflows) at once; right after, tenant B
publishes 50 three-step workflows. Prints B's create-to-complete p50/p99 under the flood and on
an idle fleet, and their ratio, as JSON. B is placed in another lane than A (as two tenants are
with probability 7/8 under the default 8 lanes); `--same-lane` measures the unlucky case.

    python bench/fairness.py [--flood-steps 20000] [--workers 2] [--same-lane]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.broker import Broker, Outgoing, Topology
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import digest_of
from stepfleet.store import PgStore
from stepfleet.store.migrate import ensure_database, upgrade

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import AMQP, BASE_DB, ORDER, percentile, start_workers, stop_workers


async def lane_of(broker: Broker, topology: Topology, tenant: str) -> int:
    probe = uuid.uuid4().hex
    headers = {"x-tenant": tenant, "x-kind": "create"}
    await broker.publish_many(
        [Outgoing(topology.ingress_exchange, f"{tenant}.create", b"{}", headers, probe, "guest")]
    )
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
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:8]
    url = make_url(BASE_DB).set(database=f"stepfleet_bench_{run_id}")
    url_text = url.render_as_string(hide_password=False)
    ensure_database(url_text)
    upgrade(url_text)
    topology = Topology(f"bench-{run_id}")
    broker = Broker(AMQP, topology)
    await broker.connect()
    await broker.declare()
    flooder = "flood"
    lane = await lane_of(broker, topology, flooder)
    calm = "calm0"
    for attempt in range(100):
        calm = f"calm{attempt}"
        if (await lane_of(broker, topology, calm) == lane) == args.same_lane:
            break
    wasm = ORDER.read_bytes()
    digest = digest_of(wasm)
    store = PgStore(url_text, pool_size=1)
    for tenant in (flooder, calm):
        await store.put_module(tenant, digest, wasm)
    await store.close()
    env = {
        **os.environ,
        "STEPFLEET_DATABASE_URL": url_text,
        "STEPFLEET_AMQP_URL": AMQP,
        "STEPFLEET_PREFIX": topology.prefix,
        "STEPFLEET_LOG_LEVEL": "warning",
    }
    workers = start_workers(args.workers, env)
    try:
        async with Producer(AMQP, topology) as producer:
            await run_b(producer, url_text, calm, digest)  # warm: connections, compiled module
            idle = await run_b(producer, url_text, calm, digest)
            flood = [
                CreateRequest(flooder, digest, {"order_id": f"A-{i}", "amount": 1}, f"a-{i}")
                for i in range(args.flood_steps // 3)
            ]
            for offset in range(0, len(flood), 1000):
                await producer.create_batch(flood[offset : offset + 1000])
            loaded = await run_b(producer, url_text, calm, digest)
        engine = create_engine(url_text)
        with engine.connect() as connection:
            flood_done = connection.execute(
                text(
                    "SELECT count(*) FROM instances WHERE tenant = 'flood' AND status = 'complete'"
                )
            ).scalar_one()
        engine.dispose()
    finally:
        stop_workers(workers)
        await broker.delete_topology()
        await broker.close()
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        admin.dispose()
    report = {
        "workers": args.workers,
        "lanes": topology.lanes,
        "same_lane": args.same_lane,
        "flood_steps": len(flood) * 3,
        "flood_workflows_complete_when_b_done": flood_done,
        "b_idle_ms": {
            "p50": round(percentile(idle, 0.5), 1),
            "p99": round(percentile(idle, 0.99), 1),
        },
        "b_flood_ms": {
            "p50": round(percentile(loaded, 0.5), 1),
            "p99": round(percentile(loaded, 0.99), 1),
        },
    }
    report["ratio_p50"] = round(report["b_flood_ms"]["p50"] / report["b_idle_ms"]["p50"], 2)  # type: ignore[index]
    report["ratio_p99"] = round(report["b_flood_ms"]["p99"] / report["b_idle_ms"]["p99"], 2)  # type: ignore[index]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
