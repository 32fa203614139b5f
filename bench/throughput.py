"""Throughput and latency of the fleet: N three-step workflows through RabbitMQ + PostgreSQL.

Runs against the local services with full durability (quorum queues, publisher confirms,
synchronous commit), in a database and broker prefix of its own, and prints JSON:
workflows/s, steps/s and create-to-complete latency p50/p99, for one and for several worker
processes, plus the unloaded latency of one workflow at a time.

    python bench/throughput.py [--workflows 2000] [--workers 1,2] [--log-level warning]

`--metrics-ab N` instead runs N pairs of bursts on one worker process, each pair once with
metrics off and once with them on (STEPFLEET_METRICS_PORT set, /metrics scraped every
second), in the order off-on, on-off, off-on, ..., a fresh worker each time, and prints both
sides' workflows/s and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import urllib.request
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.broker import Broker, Topology
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import digest_of
from stepfleet.store import PgStore
from stepfleet.store.migrate import ensure_database, upgrade

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, BASE_DB
from phases import per_delivery, snapshot, start_worker

ROOT = Path(__file__).resolve().parents[1]
ORDER = ROOT / "guest" / "examples" / "order" / "order.wasm"
STEPS_PER_WORKFLOW = 3


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_workers(count: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    return [start_worker(env) for _ in range(count)]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each worker; one still running 60 s later is killed, and said so on stderr."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print(f"worker {worker.pid} still ran 60 s after SIGTERM: killed", file=sys.stderr)
            worker.kill()
            worker.wait()


async def completion_times(store_url: str, ids: list[str]) -> dict[str, datetime]:
    """Wait until every instance is final; return when each one finished (database clock).

    The times come from the rows, so the poll only counts, every 250 ms: reading every row
    twenty times a second took CPU from the workers being measured."""
    engine = create_engine(store_url)
    final = ["complete", "errored"]
    try:
        with engine.connect() as connection:
            while True:
                done = connection.execute(
                    text(
                        "SELECT count(*) FROM instances "
                        "WHERE id = ANY(:ids) AND status = ANY(:final)"
                    ),
                    {"ids": ids, "final": final},
                ).scalar_one()
                connection.commit()
                if done == len(ids):
                    break
                await asyncio.sleep(0.25)
            rows = connection.execute(
                text("SELECT id, status, updated_at FROM instances WHERE id = ANY(:ids)"),
                {"ids": ids},
            ).all()
    finally:
        engine.dispose()
    errored = [r.id for r in rows if r.status != "complete"]
    if errored:
        raise SystemExit(f"{len(errored)} workflows errored, e.g. {errored[0]}")
    return {row.id: row.updated_at for row in rows}


async def run_load(url: str, topology: Topology, digest: str, workflows: int) -> dict[str, float]:
    ids = [f"bench-{uuid.uuid4().hex[:16]}" for _ in range(workflows)]
    requests = [
        CreateRequest("acme", digest, {"order_id": f"B-{i}", "amount": 100 + i, "items": 2}, ids[i])
        for i in range(workflows)
    ]
    published: dict[str, datetime] = {}
    async with Producer(AMQP, topology) as producer:
        started = datetime.now(UTC)
        for offset in range(0, workflows, 500):
            chunk = requests[offset : offset + 500]
            await producer.create_batch(chunk)
            now = datetime.now(UTC)
            for request in chunk:
                assert request.instance_id is not None
                published[request.instance_id] = now
    finished = await completion_times(url, ids)
    end = max(finished.values())
    seconds = (end - started).total_seconds()
    latencies = [(finished[i] - published[i]).total_seconds() * 1000 for i in ids]
    return {
        "workflows": workflows,
        "seconds": round(seconds, 3),
        "workflows_per_s": round(workflows / seconds, 1),
        "steps_per_s": round(workflows * STEPS_PER_WORKFLOW / seconds, 1),
        "deliveries_per_s": round(workflows * (STEPS_PER_WORKFLOW + 1) / seconds, 1),
        "latency_ms_p50": round(percentile(latencies, 0.50), 2),
        "latency_ms_p99": round(percentile(latencies, 0.99), 2),
    }


async def run_unloaded(url: str, topology: Topology, digest: str, count: int) -> dict[str, float]:
    """One workflow at a time: create-to-complete latency of an idle fleet.

    Completion is taken from the instance's updated_at (same host clock), and the poll is slow
    on purpose so that the benchmark does not steal the CPU it is measuring.
    """
    latencies = []
    store = PgStore(url, pool_size=1)
    gc.freeze()  # the benchmark's own full collections paused its timing by 50-60 ms
    async with Producer(AMQP, topology) as producer:
        for i in range(count):
            instance_id = f"solo-{uuid.uuid4().hex[:16]}"
            begin = datetime.now(UTC)
            await producer.create(
                CreateRequest(
                    "acme", digest, {"order_id": f"U-{i}", "amount": 1, "items": 1}, instance_id
                )
            )
            while True:
                await asyncio.sleep(0.05)
                found = await store.find_instances(instance_id, "acme")
                if found and found[0][0].status.is_final:
                    break
            finished = found[0][0].updated_at
            assert finished is not None
            latencies.append((finished - begin).total_seconds() * 1000)
    await store.close()
    return {
        "workflows": count,
        "latency_ms_p50": round(statistics.median(latencies), 2),
        "latency_ms_p99": round(percentile(latencies, 0.99), 2),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def scrape_every_second(port: int, scrapes: list[int]) -> None:
    """Scrape /metrics as Prometheus would (more often than its default 15 s)."""

    def scrape() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return len(answer.read())

    while True:
        await asyncio.sleep(1.0)
        with suppress(OSError):
            scrapes.append(await asyncio.to_thread(scrape))


async def metrics_ab(
    url: str, topology: Topology, digest: str, workflows: int, pairs: int, env: dict[str, str]
) -> dict[str, object]:
    """Bursts on one worker, alternately with metrics off and on; workflows/s of each."""
    runs: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    scrapes: list[int] = []
    for pair in range(pairs):
        # off-on, then on-off: a machine that slows down (or speeds up) during the run
        # weighs on both sides alike.
        for mode in ("off", "on") if pair % 2 == 0 else ("on", "off"):
            port = free_port()
            own = {**env, "STEPFLEET_METRICS_PORT": str(port)} if mode == "on" else env
            workers = start_workers(1, own)
            scraper = None
            try:
                await run_load(url, topology, digest, 50)  # warm: connections, compiled module
                if mode == "on":
                    scraper = asyncio.create_task(scrape_every_second(port, scrapes))
                before = await snapshot(workers)
                load = await run_load(url, topology, digest, workflows)
                after = await snapshot(workers)
            finally:
                if scraper is not None:
                    scraper.cancel()
                    with suppress(asyncio.CancelledError):
                        await scraper
                stop_workers(workers)
            runs[mode].append(load["workflows_per_s"])
            deliveries = after.get("deliveries", 0) - before.get("deliveries", 0)
            cpu[mode].append(
                round((after["cpu_seconds"] - before["cpu_seconds"]) / deliveries * 1000, 4)
            )
    off, on = statistics.mean(runs["off"]), statistics.mean(runs["on"])
    return {
        "workflows": workflows,
        "workflows_per_s_off": runs["off"],
        "workflows_per_s_on": runs["on"],
        "cpu_ms_per_delivery_off": cpu["off"],
        "cpu_ms_per_delivery_on": cpu["on"],
        "scrapes": len(scrapes),
        "scrape_bytes": scrapes[-1] if scrapes else 0,
        "on_vs_off": round(on / off, 4),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=2000)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker process counts")
    parser.add_argument("--unloaded", type=int, default=100)  # as the minimal loop's k
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--metrics-ab", type=int, default=0, metavar="PAIRS", help="metrics off/on pairs"
    )
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:8]
    url = (
        make_url(BASE_DB)
        .set(database=f"stepfleet_bench_{run_id}")
        .render_as_string(hide_password=False)
    )
    ensure_database(url)
    upgrade(url)
    topology = Topology(f"bench-{run_id}")
    broker = Broker(AMQP, topology)
    await broker.connect()
    await broker.declare()
    wasm = ORDER.read_bytes()
    digest = digest_of(wasm)
    store = PgStore(url, pool_size=1)
    await store.put_module("acme", digest, wasm)
    await store.close()
    env = {
        **os.environ,
        "STEPFLEET_DATABASE_URL": url,
        "STEPFLEET_AMQP_URL": AMQP,
        "STEPFLEET_PREFIX": topology.prefix,
        "STEPFLEET_LOG_LEVEL": args.log_level,
        "STEPFLEET_CONCURRENCY": str(args.concurrency),
        "STEPFLEET_BATCH_SIZE": str(args.batch_size),
    }
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            "concurrency": args.concurrency,
            "batch_size": args.batch_size,
            "log_level": args.log_level,
        },
    }
    try:
        if args.metrics_ab:
            report["metrics_ab_1_worker"] = await metrics_ab(
                url, topology, digest, args.workflows, args.metrics_ab, env
            )
        for count in [int(c) for c in args.workers.split(",") if not args.metrics_ab]:
            workers = start_workers(count, env)
            try:
                await run_load(url, topology, digest, 50)  # warm: connections, compiled module
                before = await snapshot(workers)
                load = await run_load(url, topology, digest, args.workflows)
                after = await snapshot(workers)
                report[f"load_{count}_workers"] = {**load, "phases": per_delivery(before, after)}
                if count == 1 and args.unloaded:
                    unloaded = await run_unloaded(url, topology, digest, args.unloaded)
                    report["unloaded_1_worker"] = {
                        **unloaded,
                        "phases": per_delivery(after, await snapshot(workers)),
                    }
            finally:
                stop_workers(workers)
    finally:
        await broker.delete_topology()
        await broker.close()
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(
                text(f'DROP DATABASE IF EXISTS "stepfleet_bench_{run_id}" WITH (FORCE)')
            )
        admin.dispose()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
