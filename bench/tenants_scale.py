"""Tenant scale: broker objects, broker memory, worker memory and database rows as tenants grow.

For each count in `--tenants` (10, 1,000 and 10,000 by default), a fresh deployment
(bench/harness.py) knows that many tenants (tenant rows with the module pushed); `--workers`
worker processes start, and each of a `--fraction` of the tenants (all by default) creates one
three-step order workflow, all published at once. Until they are all final, every 0.5 s the
bench reads:

- the deployment's RabbitMQ queues (names starting with its prefix; management API,
  `STEPFLEET_BENCH_RABBITMQ_API`, http://guest:guest@127.0.0.1:15672 by default);
- the broker node's `mem_used` (the whole node: other deployments on it count too);
- each worker process's resident memory (`VmRSS` in /proc/<pid>/status), and its peak
  (`VmHWM`) at the end.

Printed for each count, as JSON: those figures before the workflows (1 s after every worker
consumes every work queue), their maximum while the workflows ran and at the end, the seconds
from the first publish to the last completion (the first run also compiles the module), and
the PostgreSQL rows the run inserted, updated and deleted in the deployment's database
(`pg_stat_database`, read after the workers exited, so that their counts are flushed).

    python bench/tenants_scale.py [--tenants 10,1000,10000] [--fraction 1.0] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.client import CreateRequest, Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, Deployment, bench_deployment
from throughput import ORDER, start_workers, stop_workers

API = os.environ.get("STEPFLEET_BENCH_RABBITMQ_API", "http://guest:guest@127.0.0.1:15672")
MIB = 1024 * 1024


def _get(path: str) -> Any:
    """GET a management API resource (blocking; the answers are small)."""
    parts = urllib.parse.urlsplit(API)
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    request = urllib.request.Request(base + path)  # noqa: S310 (our own URL)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (our own URL)
        return json.load(answer)


def queue_count(prefix: str) -> int:
    """Queues whose name starts with the deployment's prefix, in any virtual host."""
    pattern = urllib.parse.quote("^" + prefix.replace(".", r"\.") + r"\.")
    found = _get(f"/api/queues?page=1&page_size=100&name={pattern}&use_regex=true&columns=name")
    return int(found["filtered_count"])


async def consuming(prefix: str, consumers: int) -> None:
    """Wait (at most 60 s) until each of the deployment's work queues has `consumers`
    consumers: the workers are up, their tenants loaded."""
    pattern = urllib.parse.quote("^" + prefix.replace(".", r"\.") + r"\.work\.")
    for _ in range(120):
        found = _get(
            f"/api/queues?page=1&page_size=500&name={pattern}&use_regex=true&columns=name,consumers"
        )
        if found["items"] and all(q.get("consumers", 0) >= consumers for q in found["items"]):
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"the workers did not consume {prefix}'s work queues within 60 s")


def broker_mib() -> float:
    nodes = _get("/api/nodes?columns=mem_used")
    return round(sum(int(node["mem_used"]) for node in nodes) / MIB, 1)


def rss_mib(workers: list[subprocess.Popen[bytes]], field: str = "VmRSS") -> list[float]:
    """A /proc/<pid>/status memory field of each worker, in MiB (0 for one that exited)."""
    sizes = []
    for worker in workers:
        try:
            status = Path(f"/proc/{worker.pid}/status").read_text()
        except FileNotFoundError:
            sizes.append(0.0)
            continue
        line = next(line for line in status.splitlines() if line.startswith(field + ":"))
        sizes.append(round(int(line.split()[1]) / 1024, 1))
    return sizes


def sample(prefix: str, workers: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    return {
        "queues": queue_count(prefix),
        "broker_mib": broker_mib(),
        "worker_rss_mib": rss_mib(workers),
    }


def db_rows(url: str) -> dict[str, int]:
    """Rows inserted, updated and deleted in the database so far (a fresh connection, so that
    the statistics are not an old snapshot)."""
    database = make_url(url).database
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                text(
                    "SELECT tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
                    "WHERE datname = :d"
                ),
                {"d": database},
            ).one()
    finally:
        engine.dispose()
    return {"inserted": row[0], "updated": row[1], "deleted": row[2]}


async def one_count(tenants: int, fraction: float, workers_count: int) -> dict[str, Any]:
    async with bench_deployment(ORDER) as deployment:
        width = len(str(max(tenants - 1, 1)))
        names = [f"t{i:0{width}d}" for i in range(tenants)]
        await deployment.populate(names)
        running = names[: max(1, round(tenants * fraction))]
        await asyncio.sleep(1.5)  # let the statistics of the inserts settle
        rows_before = db_rows(deployment.url)
        prefix = deployment.topology.prefix
        workers = start_workers(workers_count, deployment.env)
        try:
            await consuming(prefix, workers_count)
            await asyncio.sleep(1)
            idle = sample(prefix, workers)
            seconds, peak = await run_all(deployment, running, workers)
            end = sample(prefix, workers)
            end["worker_peak_rss_mib"] = rss_mib(workers, "VmHWM")
        finally:
            stop_workers(workers)
        await asyncio.sleep(1.5)
        rows_after = db_rows(deployment.url)
    rows = {kind: rows_after[kind] - rows_before[kind] for kind in rows_before}
    touched = sum(rows.values())
    return {
        "tenants": tenants,
        "workflows": len(running),
        "seconds": round(seconds, 2),
        "idle": idle,
        "max_while_running": peak,
        "end": end,
        "pg_rows": {**rows, "per_workflow": round(touched / len(running), 1)},
    }


async def run_all(
    deployment: Deployment, tenants: list[str], workers: list[subprocess.Popen[bytes]]
) -> tuple[float, dict[str, Any]]:
    """One workflow per tenant, published at once; wait (sampling every 0.5 s) until all are
    final. Returns the seconds from the first publish to the last completion, and the largest
    value of each figure seen meanwhile."""
    digest, prefix = deployment.digest, deployment.topology.prefix
    requests = [
        CreateRequest(t, digest, {"order_id": f"{t}-1", "amount": 1}, f"{t}-scale") for t in tenants
    ]
    peak: dict[str, Any] = {}
    engine = create_engine(deployment.url)
    started = datetime.now(UTC)
    try:
        async with Producer(AMQP, deployment.topology) as producer:
            for offset in range(0, len(requests), 1000):
                await producer.create_batch(requests[offset : offset + 1000])
        with engine.connect() as db:
            while True:
                now = sample(prefix, workers)
                peak = {
                    "queues": max(now["queues"], peak.get("queues", 0)),
                    "broker_mib": max(now["broker_mib"], peak.get("broker_mib", 0.0)),
                    "worker_rss_mib": [
                        max(pair)
                        for pair in zip(
                            now["worker_rss_mib"],
                            peak.get("worker_rss_mib", [0.0] * len(workers)),
                            strict=True,
                        )
                    ],
                }
                done, errored, last = db.execute(
                    text(
                        "SELECT count(*), count(*) FILTER (WHERE status = 'errored'), "
                        "max(updated_at) FROM instances WHERE status IN ('complete', 'errored')"
                    )
                ).one()
                db.commit()
                if errored:
                    raise SystemExit(f"{errored} workflows errored")
                if done >= len(tenants):
                    return (last - started).total_seconds(), peak
                await asyncio.sleep(0.5)
    finally:
        engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", default="10,1000,10000", help="comma-separated counts")
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="share of the tenants that run a workflow"
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    counts = [int(count) for count in args.tenants.split(",")]
    if min(counts) < 1:
        parser.error("--tenants counts must be at least 1")
    report: dict[str, Any] = {"workers": args.workers, "fraction": args.fraction, "runs": []}
    for count in counts:
        report["runs"].append(await one_count(count, args.fraction, args.workers))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
