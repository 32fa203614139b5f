"""CPU hogs: tenant B's latency while tenant A's runs each burn their whole CPU budget.

Tenant A ("hog") runs a module that spins until its fuel runs out (guest/hostile/loop.wat),
with `--hog-fuel` units per run (about a second each on the development machine); it keeps
`--hogs` such runs queued on the fleet the whole time. Tenant B ("calm") runs three-step order
workflows one after another (for at most `--seconds` under the hogs). Prints, as JSON, B's create-to-complete p50/p99 on the idle
fleet and under the hogs, and their ratio, for `--guest-processes` guest processes per worker
(0: the one guest thread).

    python bench/hogs.py [--workers 2] [--guest-processes 1] [--hogs 8] [--workflows 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import wasmtime
from sqlalchemy import create_engine, text

from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import TenantLimits, digest_of
from stepfleet.store import PgStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, bench_deployment
from throughput import ORDER, ROOT, percentile, start_workers, stop_workers

LOOP = ROOT / "guest" / "hostile" / "loop.wat"


async def one_b(
    producer: Producer, engine, tenant: str, digest: str, until: float
) -> tuple[float, bool]:
    """Create one B workflow and wait for it, until `until` (monotonic seconds); its
    create-to-complete milliseconds (so far, if not complete) and whether it completed."""
    instance = f"b-{uuid.uuid4().hex}"
    started = datetime.now(UTC)
    await producer.create(
        CreateRequest(tenant, digest, {"order_id": instance, "amount": 1}, instance)
    )
    while True:
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT status, updated_at FROM instances WHERE tenant = :t AND id = :i"),
                {"t": tenant, "i": instance},
            ).first()
        if row is not None and row.status == "complete":
            return (row.updated_at - started).total_seconds() * 1000, True
        if row is not None and row.status == "errored":
            raise SystemExit(f"B's workflow {instance} errored")
        if time.monotonic() > until:
            return (datetime.now(UTC) - started).total_seconds() * 1000, False
        await asyncio.sleep(0.005)


async def run_b(
    producer: Producer, engine, tenant: str, digest: str, count: int, seconds: float
) -> tuple[list[float], int]:
    """B's workflows one after another, for at most `seconds`: latencies, and how many of
    them completed (the last one may not have)."""
    until = time.monotonic() + seconds
    latencies: list[float] = []
    complete = 0
    for _ in range(count):
        ms, done = await one_b(producer, engine, tenant, digest, until)
        latencies.append(ms)
        complete += done
        if not done:
            break
    return latencies, complete


def hogs_done(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(
            text("SELECT count(*) FROM instances WHERE tenant = 'hog' AND status = 'errored'")
        ).scalar_one()


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5), 1), "p99": round(percentile(values, 0.99), 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--guest-processes", type=int, default=1)
    parser.add_argument("--hogs", type=int, default=8, help="A's runs kept queued")
    parser.add_argument("--hog-fuel", type=int, default=1_000_000_000)
    parser.add_argument("--workflows", type=int, default=40, help="B's workflows per phase")
    parser.add_argument(
        "--seconds", type=float, default=60, help="stop B's phase under the hogs after this"
    )
    args = parser.parse_args()

    hog_wasm = wasmtime.wat2wasm(LOOP.read_text())
    hog_digest = digest_of(hog_wasm)
    async with bench_deployment(ORDER) as deployment:
        digest, url = deployment.digest, deployment.url
        await deployment.push("calm")
        store = PgStore(url, pool_size=1)
        try:
            await store.put_module("hog", hog_digest, hog_wasm)
        finally:
            await store.close()
        await deployment.limit("hog", TenantLimits(fuel_per_run=args.hog_fuel))
        env = {**deployment.env, "STEPFLEET_GUEST_PROCESSES": str(args.guest_processes)}
        workers = start_workers(args.workers, env)
        engine = create_engine(url)
        sent = 0
        try:
            async with Producer(AMQP, deployment.topology) as producer:
                await run_b(producer, engine, "calm", digest, 5, 60)  # warm: connections, modules
                idle, _ = await run_b(producer, engine, "calm", digest, args.workflows, 60)

                async def feed_hogs(stop: asyncio.Event) -> None:
                    nonlocal sent
                    while not stop.is_set():
                        missing = args.hogs - (sent - hogs_done(engine))
                        if missing > 0:
                            await producer.create_batch(
                                [
                                    CreateRequest("hog", hog_digest, {}, f"hog-{sent + i}")
                                    for i in range(missing)
                                ]
                            )
                            sent += missing
                        await asyncio.sleep(0.1)

                stop = asyncio.Event()
                feeding = asyncio.create_task(feed_hogs(stop))
                while hogs_done(engine) < 2:  # noqa: ASYNC110 (the hogs are running)
                    await asyncio.sleep(0.05)
                began = time.monotonic()
                done_before = hogs_done(engine)
                loaded, complete = await run_b(
                    producer, engine, "calm", digest, args.workflows, args.seconds
                )
                hog_runs = hogs_done(engine) - done_before
                seconds = time.monotonic() - began
                stop.set()
                await feeding
        finally:
            engine.dispose()
            stop_workers(workers)
    report = {
        "workers": args.workers,
        "guest_processes_per_worker": args.guest_processes,
        "hog_fuel_per_run": args.hog_fuel,
        "hogs_queued": args.hogs,
        "hog_runs_during_b": hog_runs,
        "hog_runs_per_second": round(hog_runs / seconds, 2),
        "b_idle_ms": summary(idle),
        "b_under_hogs_ms": summary(loaded),
        "b_under_hogs_complete": f"{complete} of {len(loaded)} (a last one still running "
        "counts with its time so far)",
        "ratio_p50": round(percentile(loaded, 0.5) / percentile(idle, 0.5), 2),
        "ratio_p99": round(percentile(loaded, 0.99) / percentile(idle, 0.99), 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
