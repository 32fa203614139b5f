"""How late durable timers fire: N sleeping workflows through RabbitMQ + PostgreSQL.

Each workflow sleeps a random 0.5 to 5 s, then records `now`. Lateness is that recorded time
minus the sleep's due time (both from the worker's clock). Prints JSON with p50/p99/max.

    python bench/timers.py [--workflows 500] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.broker import Broker, Topology
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import digest_of
from stepfleet.store import PgStore
from stepfleet.store.migrate import ensure_database, upgrade

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import AMQP, BASE_DB, percentile, start_workers, stop_workers

PLAYBOOK = Path(__file__).resolve().parents[1] / "guest" / "examples" / "playbook" / "playbook.wasm"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
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
    wasm = PLAYBOOK.read_bytes()
    digest = digest_of(wasm)
    store = PgStore(url_text, pool_size=1)
    await store.put_module("acme", digest, wasm)
    await store.close()
    env = {
        **os.environ,
        "STEPFLEET_DATABASE_URL": url_text,
        "STEPFLEET_AMQP_URL": AMQP,
        "STEPFLEET_PREFIX": topology.prefix,
        "STEPFLEET_LOG_LEVEL": "warning",
    }
    workers = start_workers(args.workers, env)
    engine = create_engine(url_text)
    try:
        ids = [f"sleep-{i}-{uuid.uuid4().hex[:8]}" for i in range(args.workflows)]
        requests = [
            CreateRequest(
                "acme",
                digest,
                {
                    "ops": [
                        {"op": "sleep", "name": "nap", "ms": random.randint(500, 5000)},
                        {"op": "now", "name": "woke"},
                    ]
                },
                instance_id,
            )
            for instance_id in ids
        ]
        async with Producer(AMQP, topology) as producer:
            await producer.create_batch(requests)
        while True:
            with engine.connect() as connection:
                done = connection.execute(
                    text("SELECT count(*) FROM instances WHERE status = 'complete'")
                ).scalar_one()
            if done == len(ids):
                break
            await asyncio.sleep(0.5)
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT s.value AS due, n.value AS woke FROM journal s JOIN journal n "
                    "ON n.tenant = s.tenant AND n.instance_id = s.instance_id AND n.seq = 1 "
                    "WHERE s.seq = 0"
                )
            ).all()
        late = [int(row.woke) - int(row.due) for row in rows]
        print(
            json.dumps(
                {
                    "workflows": len(late),
                    "workers": args.workers,
                    "lateness_ms_p50": percentile(late, 0.5),
                    "lateness_ms_p99": percentile(late, 0.99),
                    "lateness_ms_max": max(late),
                    "early": sum(1 for value in late if value < 0),
                },
                indent=2,
            )
        )
    finally:
        stop_workers(workers)
        engine.dispose()
        await broker.delete_topology()
        await broker.close()
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    asyncio.run(main())
