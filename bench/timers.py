"""How late durable timers fire: N sleeping workflows through RabbitMQ + PostgreSQL.

Each workflow sleeps a random time between --sleep-ms MIN,MAX (0.5 to 5 s by default), then
records `now`. Lateness is that recorded time minus the sleep's due time (both from the
worker's clock). Prints JSON with p50/p99/max, and how many timers fired per second (the
busiest second, and on average from the first to the last): with many timers due close
together, what the timer loop and the wakes' steps get through.

    python bench/timers.py [--workflows 500] [--workers 1] [--sleep-ms 500,5000]
    python bench/timers.py --workflows 100000 --workers 2 --sleep-ms 120000,420000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid
from collections import Counter
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
    parser.add_argument("--sleep-ms", default="500,5000", help="MIN,MAX of the random sleeps")
    args = parser.parse_args()
    shortest, longest = (int(ms) for ms in args.sleep_ms.split(","))

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
                            {
                                "op": "sleep",
                                "name": "nap",
                                "ms": random.randint(shortest, longest),
                            },
                            {"op": "now", "name": "woke"},
                        ]
                    },
                    f"sleep-{i}-{uuid.uuid4().hex[:8]}",
                )
                for i in range(args.workflows)
            ]
            async with Producer(AMQP, deployment.topology) as producer:
                for offset in range(0, len(requests), 5000):
                    await producer.create_batch(requests[offset : offset + 5000])
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
    seconds = Counter(int(row.woke) // 1000 for row in rows)
    span = (max(seconds) - min(seconds) + 1) if seconds else 1
    report = {
        "workflows": len(late),
        "workers": args.workers,
        "lateness_ms_p50": percentile(late, 0.5),
        "lateness_ms_p99": percentile(late, 0.99),
        "lateness_ms_max": max(late),
        "early": sum(1 for value in late if value < 0),
        "sleep_ms": [shortest, longest],
        "fired_per_s_busiest": max(seconds.values(), default=0),
        "fired_per_s_mean": round(len(late) / span, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
