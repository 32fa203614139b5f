"""How late durable timers fire: N sleeping workflows through RabbitMQ + PostgreSQL.

Each workflow sleeps a random 0.5 to 5 s, then records `now`. Lateness is that recorded time
minus the sleep's due time (both from the worker's clock). Prints JSON with p50/p99/max.

    python bench/timers.py [--workflows 500] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from stepfleet.client import CreateRequest, Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, bench_deployment
from throughput import percentile, start_workers, stop_workers

PLAYBOOK = Path(__file__).resolve().parents[1] / "guest" / "examples" / "playbook" / "playbook.wasm"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    async with bench_deployment(PLAYBOOK) as deployment:
        await deployment.push("acme")
        workers = start_workers(args.workers, deployment.env)
        engine = create_engine(deployment.url)
        try:
            requests = [
                CreateRequest(
                    "acme",
                    deployment.digest,
                    {
                        "ops": [
                            {"op": "sleep", "name": "nap", "ms": random.randint(500, 5000)},
                            {"op": "now", "name": "woke"},
                        ]
                    },
                    f"sleep-{i}-{uuid.uuid4().hex[:8]}",
                )
                for i in range(args.workflows)
            ]
            async with Producer(AMQP, deployment.topology) as producer:
                await producer.create_batch(requests)
            while True:
                with engine.connect() as connection:
                    done = connection.execute(
                        text("SELECT count(*) FROM instances WHERE status = 'complete'")
                    ).scalar_one()
                if done == len(requests):
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
        finally:
            stop_workers(workers)
            engine.dispose()
    late = [int(row.woke) - int(row.due) for row in rows]
    report = {
        "workflows": len(late),
        "workers": args.workers,
        "lateness_ms_p50": percentile(late, 0.5),
        "lateness_ms_p99": percentile(late, 0.99),
        "lateness_ms_max": max(late),
        "early": sum(1 for value in late if value < 0),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
