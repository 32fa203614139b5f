"""Fairness: tenant B's latency and tenant A's throughput while A floods or hogs the fleet.

Each mode runs in fresh deployments of its own (bench/harness.py) with `--workers` worker
processes and prints JSON. Tenant B always runs three-step order workflows one after another
(create, wait until complete, next); its create-to-complete latency (publish to the instance's
`updated_at`) is compared with the same measure on the idle fleet, taken just before.

- Placements (default): `--tenants` tenants are known to the fleet (tenant rows with the
  module pushed). Tenant A publishes a burst of `--flood-steps` steps (three-step order
  workflows), from a process of its own as another producer would, while B runs until A's
  flood is complete, at least `--b-min` workflows. Lanes follow the routing key
  `<tenant>.<kind>`, so B's name, chosen among the known tenants, decides where B lands
  against A: `apart` (neither of B's create and step lanes is one of A's),
  `same-create` (B's creates share A's create lane) and `same-step` (B's steps share A's step or
  create lane). Each placement gets a deployment of its own; printed for each: B's idle and
  flood p50/p99 and their ratio (`b_started_during_flood_ms`: only the workflows that started
  before the flood was complete; `b_flood_ms_by_phase`: those split by whether A was still
  publishing its burst when they started), and A's throughput (workflows/s from its first
  publish to its last completion; `publish_seconds`: how long publishing its burst took) with
  B against A's flood alone, run first in a deployment of its own. `worst` is the placement
  with the highest p99 ratio, and the lowest throughput ratio.
- `--hog`: tenant A's `--hogs` instances each run one step that spins until its CPU budget
  (fuel) runs out (bench/hog.wat), fails with "CPU limit exceeded" and is retried at once, up to
  1,000 times, so A keeps the workers' guests busy. B runs `--hog-runs` workflows among them.
  Printed: B's p50/p99 under the hogs against idle, and the hog attempts that ended meanwhile.
- `--weights`: two tenants with weights 1 and 3 (`TenantLimits(weight=...)`) publish
  `--flood-steps` steps each at once (interleaved). Their journal rows (steps done) are counted
  every 0.5 s; the window starts 1 s after the last publish and ends after `--window` seconds
  or when either tenant has less than a tenth of its steps left. Printed: each tenant's steps/s
  in the window and their ratio (heavier over lighter).

- `--busy-loops N`: no flood; B runs `--b-idle` workflows on the idle fleet, then as many again
  while N processes that have nothing to do with the fleet spin on the CPU (`--busy-nice`
  their nice increment). Printed: B's p50/p99 beside them against idle, and the share of the
  machine's CPU time that was busy meanwhile (as the placements print it for the flood): how
  much of B's tail under a flood saturated cores give by themselves.

`--placement` picks one placement (in `--weights`, where the second tenant sits against the
first; `apart` by default; in `--hog`, where B sits against the hog). `--flooder-rate N` gives A
a steps-per-second limit. Needs PostgreSQL and RabbitMQ (as `./dev check`); asserts nothing.

    python bench/fairness.py [--tenants 1000] [--flood-steps 20000] [--b-min 100] [--b-idle 100]
                             [--placement apart|same-create|same-step] [--workers 2]
    python bench/fairness.py --hog [--hogs 16] [--hog-runs 20] [--hog-fuel N]
    python bench/fairness.py --weights [--flood-steps 20000] [--window 15]
    python bench/fairness.py --busy-loops 2 [--busy-nice 0] [--b-idle 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import wasmtime
from sqlalchemy import Connection, create_engine, text

from stepfleet.broker import Broker, Outgoing, Topology
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import TenantLimits, digest_of
from stepfleet.store import PgStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, Deployment, bench_deployment
from throughput import ORDER, percentile, start_workers, stop_workers

HOG = Path(__file__).resolve().parent / "hog.wat"
PLACEMENTS = ("apart", "same-create", "same-step")
FINAL = ("complete", "errored")
CHUNK = 1000


@dataclass(frozen=True)
class Lanes:
    """The lanes a tenant's creates and its steps land in."""

    create: int
    step: int


async def lanes_of(broker: Broker, topology: Topology, tenant: str) -> Lanes:
    """The lanes a tenant's creates and steps land in (placed by routing key); workers must
    not be running, since the probes are fetched back from the work queues."""
    found = {}
    for kind in ("create", "step"):
        internal = kind == "step"
        probe = uuid.uuid4().hex
        exchange = topology.internal_exchange if internal else topology.ingress_exchange
        headers = {"x-tenant": tenant, "x-kind": kind}
        user = None if internal else "guest"
        await broker.publish_many(
            [Outgoing(exchange, f"{tenant}.{kind}", b"{}", headers, probe, user)]
        )
        found[kind] = await _find(broker, topology, probe)
    return Lanes(found["create"], found["step"])


async def _find(broker: Broker, topology: Topology, probe: str) -> int:
    while True:
        for lane, queue in enumerate(topology.work_queues):
            for delivery in await broker.fetch(queue, limit=100):
                await delivery.ack()
                if delivery.message_id == probe:
                    return lane
        await asyncio.sleep(0.05)


def placement_of(a: Lanes, b: Lanes, placement: str, strict: bool) -> bool:
    """Whether B sits against A as `placement` says; `strict` also keeps B's other lane out of
    A's lanes, so that only the named lane is shared."""
    theirs = {a.create, a.step}
    if placement == "apart":
        return not {b.create, b.step} & theirs
    if placement == "same-create":
        return b.create == a.create and (not strict or b.step not in theirs)
    if placement == "same-step":
        return b.step in theirs and (not strict or b.create not in theirs)
    raise ValueError(f"unknown placement {placement!r}")


async def choose(
    deployment: Deployment, a: str, candidates: list[str], placement: str
) -> tuple[str, Lanes, Lanes]:
    """A's lanes, and the first candidate (with its lanes) placed against A as asked: one whose
    other lane is clear of A's if any, else the first that shares the named lane at all."""
    broker, topology = deployment.broker, deployment.topology
    a_lanes = await lanes_of(broker, topology, a)
    loose: tuple[str, Lanes] | None = None
    for name in candidates:
        b_lanes = await lanes_of(broker, topology, name)
        if placement_of(a_lanes, b_lanes, placement, strict=True):
            return name, a_lanes, b_lanes
        if loose is None and placement_of(a_lanes, b_lanes, placement, strict=False):
            loose = (name, b_lanes)
    if loose is None:
        raise SystemExit(f"no tenant among {len(candidates)} is placed {placement} against {a}")
    return loose[0], a_lanes, loose[1]


def tenant_names(count: int) -> list[str]:
    width = len(str(max(count - 1, 1)))
    return [f"t{i:0{width}d}" for i in range(count)]


def order(tenant: str, digest: str, i: int) -> CreateRequest:
    instance_id = f"{tenant}-{i}-{uuid.uuid4().hex[:8]}"
    return CreateRequest(tenant, digest, {"order_id": f"{tenant}-{i}", "amount": 1}, instance_id)


def ms(values: list[float]) -> dict[str, float]:
    return {
        "runs": len(values),
        "p50": round(percentile(values, 0.5), 1),
        "p99": round(percentile(values, 0.99), 1),
    }


async def sequential(
    producer: Producer,
    db: Connection,
    tenant: str,
    digest: str,
    minimum: int,
    busy: Callable[[], bool] = lambda: False,
    give_up_s: float = 60.0,
    publishing: Callable[[], bool] = lambda: False,
) -> Runs:
    """Run workflows one after another, at least `minimum` and while `busy()`. A workflow not
    complete after `give_up_s` seconds counts as taking that long, and the next one starts.
    Each run notes whether `busy()` and `publishing()` held when it started."""
    runs = Runs([], [], 0, [])
    while len(runs.latencies) < minimum or busy():
        runs.busy.append(busy())
        runs.publishing.append(publishing())
        request = order(tenant, digest, len(runs.latencies))
        begin = datetime.now(UTC)
        await producer.create(request)
        deadline = time.monotonic() + give_up_s
        while True:
            await asyncio.sleep(0.02)
            row = db.execute(
                text(
                    "SELECT status, updated_at, error FROM instances WHERE tenant = :t AND id = :i"
                ),
                {"t": tenant, "i": request.instance_id},
            ).first()
            db.commit()
            if row is not None and row.status in FINAL:
                if row.status != "complete":
                    raise SystemExit(f"{tenant}'s workflow {request.instance_id}: {row.error}")
                runs.latencies.append((row.updated_at - begin).total_seconds() * 1000)
                break
            if time.monotonic() > deadline:
                runs.latencies.append(give_up_s * 1000)
                runs.timeouts += 1
                break
    return runs


@dataclass
class Runs:
    """B's workflows: their latencies (ms), whether each started while A was busy, how many
    were still not complete after the timeout (counted as taking the timeout), and whether
    each started while A was still publishing its burst."""

    latencies: list[float]
    busy: list[bool]
    timeouts: int
    publishing: list[bool]

    def summary(self) -> dict[str, Any]:
        return {**ms(self.latencies), "timeouts": self.timeouts}

    def while_busy(self) -> dict[str, float]:
        """The latencies of the workflows that started while A was busy."""
        during = [value for value, busy in zip(self.latencies, self.busy, strict=True) if busy]
        return ms(during) if during else {"runs": 0}

    def by_flood_phase(self) -> dict[str, dict[str, float]]:
        """The latencies of the workflows started while A published its burst, and after
        (until A's flood was complete)."""
        phases: dict[str, list[float]] = {"while_a_publishes": [], "after_a_published": []}
        for value, busy, publishing in zip(self.latencies, self.busy, self.publishing, strict=True):
            if busy:
                phases["while_a_publishes" if publishing else "after_a_published"].append(value)
        return {name: ms(values) if values else {"runs": 0} for name, values in phases.items()}


class FloodPublisher:
    """Publishes A's burst from a process of its own, as another tenant's producer would.

    In the bench's own event loop, building and publishing a chunk of 1,000 creates held B's
    create (taken at its `begin`) back by up to the chunk's length, which counted as B's
    latency while A published. The process is started (and has imported the client) before B's
    idle measure, so starting the burst costs nothing but the call."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    async def __aenter__(self) -> FloodPublisher:
        await asyncio.get_running_loop().run_in_executor(self._pool, _ready)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)

    async def publish(self, tenant: str, digest: str, workflows: int) -> tuple[datetime, datetime]:
        """Publish the burst; return when the first publish began and the last was confirmed."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, _publish_flood, self._topology, tenant, digest, workflows
        )


def _ready() -> None:
    """Run in the publisher's process once, so that it is up before it is timed."""


def _publish_flood(
    topology: Topology, tenant: str, digest: str, workflows: int
) -> tuple[datetime, datetime]:
    async def publish() -> tuple[datetime, datetime]:
        async with Producer(AMQP, topology) as producer:
            burst = [order(tenant, digest, i) for i in range(workflows)]
            started = datetime.now(UTC)
            for offset in range(0, len(burst), CHUNK):
                await producer.create_batch(burst[offset : offset + CHUNK])
            return started, datetime.now(UTC)

    return asyncio.run(publish())


async def wait_flood(
    db: Connection, tenant: str, workflows: int, started: datetime
) -> dict[str, Any]:
    """Wait (one count query every 0.2 s) until all of a tenant's workflows are final; return
    its throughput from `started` to the last completion."""
    while True:
        await asyncio.sleep(0.2)
        done = db.execute(
            text(
                "SELECT count(*) FROM instances WHERE tenant = :t "
                "AND status IN ('complete', 'errored')"
            ),
            {"t": tenant},
        ).scalar_one()
        db.commit()
        if done >= workflows:
            break
    errored, last = db.execute(
        text(
            "SELECT count(*) FILTER (WHERE status = 'errored'), max(updated_at) "
            "FROM instances WHERE tenant = :t"
        ),
        {"t": tenant},
    ).one()
    db.commit()
    seconds = (last - started).total_seconds()
    return {
        "workflows": workflows,
        "errored": errored,
        "seconds": round(seconds, 2),
        "workflows_per_s": round(workflows / seconds, 1),
    }


async def flood(
    publisher: FloodPublisher,
    db: Connection,
    tenant: str,
    digest: str,
    workflows: int,
    published: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Publish the burst (then set `published`), wait until it is done; A's throughput."""
    started, ended = await publisher.publish(tenant, digest, workflows)
    publish_seconds = (ended - started).total_seconds()
    if published is not None:
        published.set()
    return {
        **await wait_flood(db, tenant, workflows, started),
        "publish_seconds": round(publish_seconds, 2),
    }


async def a_alone(args: argparse.Namespace) -> dict[str, Any]:
    """A's flood on a fleet where nothing else runs (after the same warm-up as B's)."""
    async with bench_deployment(ORDER) as deployment:
        names = tenant_names(args.tenants)
        await deployment.populate(names)
        await _limit_flooder(deployment, names[0], args)
        engine = create_engine(deployment.url)
        workers = start_workers(args.workers, deployment.env)
        try:
            async with (
                Producer(AMQP, deployment.topology) as producer,
                FloodPublisher(deployment.topology) as publisher,
            ):
                with engine.connect() as db:
                    await sequential(producer, db, names[1], deployment.digest, 10)
                    return await flood(
                        publisher, db, names[0], deployment.digest, args.flood_steps // 3
                    )
        finally:
            stop_workers(workers)
            engine.dispose()


async def _limit_flooder(deployment: Deployment, tenant: str, args: argparse.Namespace) -> None:
    if args.flooder_rate:
        await deployment.limit(tenant, TenantLimits(steps_per_second=args.flooder_rate))


async def placed(args: argparse.Namespace, placement: str) -> dict[str, Any]:
    """B's latency, idle and during A's flood, with B placed against A as `placement` says."""
    async with bench_deployment(ORDER) as deployment:
        names = tenant_names(args.tenants)
        await deployment.populate(names)
        a = names[0]
        b, a_lanes, b_lanes = await choose(deployment, a, names[1:], placement)
        await _limit_flooder(deployment, a, args)
        engine = create_engine(deployment.url)
        workers = start_workers(args.workers, deployment.env)
        try:
            # Each tenant publishes from a process of its own, as two producers would.
            async with (
                Producer(AMQP, deployment.topology) as producer,
                FloodPublisher(deployment.topology) as publisher,
            ):
                with engine.connect() as b_db, engine.connect() as a_db:
                    digest = deployment.digest
                    await sequential(producer, b_db, b, digest, 10)  # warm: connections, module
                    idle = await sequential(
                        producer, b_db, b, digest, args.b_idle, give_up_s=args.b_timeout
                    )
                    published = asyncio.Event()
                    before = cpu_times()
                    a_flood = asyncio.create_task(
                        flood(publisher, a_db, a, digest, args.flood_steps // 3, published)
                    )
                    loaded = await sequential(
                        producer,
                        b_db,
                        b,
                        digest,
                        args.b_min,
                        lambda: not a_flood.done(),
                        args.b_timeout,
                        lambda: not published.is_set(),
                    )
                    busy = busy_share(before, cpu_times())
                    a_with_b = await a_flood
        finally:
            stop_workers(workers)
            engine.dispose()
    idle_ms, flood_ms = idle.summary(), loaded.summary()
    return {
        "a": a,
        "b": b,
        "a_lanes": vars(a_lanes),
        "b_lanes": vars(b_lanes),
        "b_idle_ms": idle_ms,
        "b_flood_ms": flood_ms,
        "b_started_during_flood_ms": loaded.while_busy(),
        "b_flood_ms_by_phase": loaded.by_flood_phase(),
        "cpu_busy_share_while_b_ran": busy,
        "ratio_p50": round(flood_ms["p50"] / idle_ms["p50"], 2),
        "ratio_p99": round(flood_ms["p99"] / idle_ms["p99"], 2),
        "a_with_b": a_with_b,
    }


async def placements(args: argparse.Namespace) -> dict[str, Any]:
    alone = await a_alone(args)
    chosen = [args.placement] if args.placement else list(PLACEMENTS)
    results = {}
    for placement in chosen:
        result = await placed(args, placement)
        with_b = result["a_with_b"]["workflows_per_s"]
        result["a_throughput_ratio"] = round(with_b / alone["workflows_per_s"], 2)
        results[placement] = result
    worst = max(results, key=lambda p: results[p]["ratio_p99"])
    slowest = min(results, key=lambda p: results[p]["a_throughput_ratio"])
    return {
        "mode": "placements",
        "workers": args.workers,
        "lanes": Topology("x").lanes,
        "tenants": args.tenants,
        "flood_steps": args.flood_steps // 3 * 3,
        "flooder_steps_per_second": args.flooder_rate,
        "a_alone": alone,
        "placements": results,
        "worst": {
            "placement": worst,
            "ratio_p99": results[worst]["ratio_p99"],
            "a_throughput_ratio": results[slowest]["a_throughput_ratio"],
            "a_throughput_placement": slowest,
        },
    }


@asynccontextmanager
async def b_beside(
    deployment: Deployment, b: str, args: argparse.Namespace
) -> AsyncIterator[tuple[Producer, Connection, Runs]]:
    """Workers up, B warmed (10 workflows) and timed on the idle fleet (`--b-idle`); yields a
    producer, a database connection and B's idle runs, and stops the workers after."""
    engine = create_engine(deployment.url)
    workers = start_workers(args.workers, deployment.env)
    try:
        async with Producer(AMQP, deployment.topology) as producer:
            with engine.connect() as db:
                await sequential(producer, db, b, deployment.digest, 10)
                idle = await sequential(
                    producer, db, b, deployment.digest, args.b_idle, give_up_s=args.b_timeout
                )
                yield producer, db, idle
    finally:
        stop_workers(workers)
        engine.dispose()


async def hog(args: argparse.Namespace) -> dict[str, Any]:
    """B's latency while tenant A's instances burn their whole CPU budget, step after step."""
    wasm = bytes(wasmtime.wat2wasm(await asyncio.to_thread(HOG.read_text)))
    async with bench_deployment(ORDER) as deployment:
        names = tenant_names(args.tenants)
        await deployment.populate(names)
        a = names[0]
        b, a_lanes, b_lanes = await choose(deployment, a, names[1:], args.placement or "apart")
        store = PgStore(deployment.url, pool_size=1)
        try:
            await store.put_module(a, digest_of(wasm), wasm)
        finally:
            await store.close()
        if args.hog_fuel:
            await deployment.limit(a, TenantLimits(fuel_per_run=args.hog_fuel))
        async with b_beside(deployment, b, args) as (producer, db, idle):
            await producer.create_batch(
                [CreateRequest(a, digest_of(wasm), {}, f"hog-{i}") for i in range(args.hogs)]
            )
            begin = datetime.now(UTC)
            await _hogs_running(db, a)
            loaded = await sequential(
                producer, db, b, deployment.digest, args.hog_runs, give_up_s=args.b_timeout
            )
            attempts = db.execute(
                text(
                    "SELECT count(*) AS n, avg(finished_at - started_at) AS mean, "
                    "min(error) AS error FROM step_attempts "
                    "WHERE tenant = :t AND finished_at >= :begin"
                ),
                {"t": a, "begin": begin},
            ).one()
            db.commit()
    idle_ms, hog_ms = idle.summary(), loaded.summary()
    mean = attempts.mean.total_seconds() if attempts.mean is not None else None
    return {
        "mode": "hog",
        "workers": args.workers,
        "a": a,
        "b": b,
        "a_lanes": vars(a_lanes),
        "b_lanes": vars(b_lanes),
        "hogs": args.hogs,
        "hog_fuel_per_run": args.hog_fuel,
        "hog_attempts_ended_while_b_ran": attempts.n,
        "hog_attempt_mean_s": None if mean is None else round(mean, 2),
        "hog_error": attempts.error,
        "b_idle_ms": idle_ms,
        "b_hog_ms": hog_ms,
        "ratio_p50": round(hog_ms["p50"] / idle_ms["p50"], 2),
        "ratio_p99": round(hog_ms["p99"] / idle_ms["p99"], 2),
    }


async def busy_loops(args: argparse.Namespace) -> dict[str, Any]:
    """B's latency on the idle fleet, then with `--busy-loops` processes that have nothing to
    do with the fleet spinning on the CPU: how much of B's tail under a flood two saturated
    cores give by themselves, whatever saturates them."""
    async with bench_deployment(ORDER) as deployment:
        names = tenant_names(args.tenants)
        await deployment.populate(names)
        b = names[1]
        async with b_beside(deployment, b, args) as (producer, db, idle):
            spinners = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    "while True: pass",
                    preexec_fn=lambda: os.nice(args.busy_nice),
                )
                for _ in range(args.busy_loops)
            ]
            try:
                await asyncio.sleep(0.5)
                before = cpu_times()
                loaded = await sequential(
                    producer, db, b, deployment.digest, args.b_idle, give_up_s=args.b_timeout
                )
                busy = busy_share(before, cpu_times())
            finally:
                for spinner in spinners:
                    spinner.kill()
                    await spinner.wait()
    idle_ms, busy_ms = idle.summary(), loaded.summary()
    return {
        "mode": "busy-loops",
        "workers": args.workers,
        "b": b,
        "busy_loops": args.busy_loops,
        "busy_nice": args.busy_nice,
        "cpu_busy_share_while_b_ran": busy,
        "b_idle_ms": idle_ms,
        "b_busy_ms": busy_ms,
        "ratio_p50": round(busy_ms["p50"] / idle_ms["p50"], 2),
        "ratio_p99": round(busy_ms["p99"] / idle_ms["p99"], 2),
    }


def cpu_times() -> tuple[int, int]:
    """The machine's busy and total CPU time so far (Linux /proc/stat, in ticks)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 3) if total else 0.0


async def _hogs_running(db: Connection, tenant: str) -> None:
    """Wait until the first hog attempt has failed, so that B meets hogs that run."""
    while True:
        await asyncio.sleep(0.2)
        started = db.execute(
            text("SELECT count(*) FROM step_attempts WHERE tenant = :t"), {"t": tenant}
        ).scalar_one()
        db.commit()
        if started:
            return


async def weights(args: argparse.Namespace) -> dict[str, Any]:
    """Steps done per second by two flooding tenants of weights 1 and 3, in the same window."""
    async with bench_deployment(ORDER) as deployment:
        names = tenant_names(args.tenants)
        await deployment.populate(names)
        light = names[0]
        heavy, light_lanes, heavy_lanes = await choose(
            deployment, light, names[1:], args.placement or "apart"
        )
        await deployment.limit(light, TenantLimits(weight=1))
        await deployment.limit(heavy, TenantLimits(weight=3))
        engine = create_engine(deployment.url)
        workers = start_workers(args.workers, deployment.env)
        steps = args.flood_steps // 3 * 3
        try:
            async with Producer(AMQP, deployment.topology) as producer:
                with engine.connect() as db:
                    digest = deployment.digest
                    others = [t for t in names if t not in (light, heavy)] or [heavy]
                    await sequential(producer, db, others[0], digest, 10)  # warm
                    floods = [
                        [order(tenant, digest, i) for i in range(steps // 3)]
                        for tenant in (light, heavy)
                    ]
                    for offset in range(0, steps // 3, CHUNK // 2):
                        for requests in floods:
                            await producer.create_batch(requests[offset : offset + CHUNK // 2])
                    published = time.monotonic()
                    samples = await _window(db, (light, heavy), steps, published, args.window)
        finally:
            stop_workers(workers)
            engine.dispose()
    (t0, first), (t1, last) = samples[0], samples[-1]
    seconds = t1 - t0
    rates = {t: round((last[t] - first[t]) / seconds, 1) for t in (light, heavy)}
    ratio = rates[heavy] / rates[light] if rates[light] else None
    return {
        "mode": "weights",
        "workers": args.workers,
        "placement": args.placement or "apart",
        "lanes": {light: vars(light_lanes), heavy: vars(heavy_lanes)},
        "weights": {light: 1, heavy: 3},
        "steps_each": steps,
        "window_s": round(seconds, 2),
        "steps_in_window": {t: last[t] - first[t] for t in (light, heavy)},
        "left_at_window_end": {t: steps - last[t] for t in (light, heavy)},
        "steps_per_s": rates,
        "ratio": None if ratio is None else round(ratio, 2),
        "within_20_percent_of_3": ratio is not None and abs(ratio - 3) <= 0.6,
    }


async def _window(
    db: Connection, tenants: tuple[str, str], steps: int, published: float, window: float
) -> list[tuple[float, dict[str, int]]]:
    """Journal rows per tenant every 0.5 s, from 1 s after `published` until `window` seconds
    passed or a tenant has less than a tenth of its steps left."""
    samples: list[tuple[float, dict[str, int]]] = []
    while True:
        await asyncio.sleep(0.5)
        rows = db.execute(
            text("SELECT tenant, count(*) FROM journal WHERE tenant = ANY(:t) GROUP BY tenant"),
            {"t": list(tenants)},
        ).all()
        db.commit()
        now = time.monotonic()
        done = {t: 0 for t in tenants}
        done.update({row[0]: row[1] for row in rows})
        if now - published < 1:
            continue
        samples.append((now, done))
        if now - samples[0][0] >= window or min(steps - d for d in done.values()) < steps // 10:
            if len(samples) < 2:
                raise SystemExit("the window closed before a second sample: flood more steps")
            return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--hog", action="store_true", help="B among CPU hogs")
    mode.add_argument("--weights", action="store_true", help="two floods of weights 1 and 3")
    mode.add_argument(
        "--busy-loops", type=int, default=0, help="B beside N CPU-bound processes of no tenant's"
    )
    parser.add_argument("--busy-nice", type=int, default=0, help="busy loops' nice increment")
    parser.add_argument("--tenants", type=int, default=1000, help="tenants known to the fleet")
    parser.add_argument("--flood-steps", type=int, default=20_000)
    parser.add_argument("--b-min", type=int, default=100, help="B's workflows during the flood")
    parser.add_argument("--b-idle", type=int, default=100, help="B's workflows on the idle fleet")
    parser.add_argument(
        "--b-timeout", type=float, default=60.0, help="seconds a B workflow counts at most"
    )
    parser.add_argument("--placement", choices=PLACEMENTS, help="one placement (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flooder-rate", type=float, help="give tenant A a steps-per-second limit")
    parser.add_argument("--hogs", type=int, default=16, help="hog instances of tenant A")
    parser.add_argument("--hog-runs", type=int, default=20, help="B's workflows among the hogs")
    parser.add_argument("--hog-fuel", type=int, help="tenant A's fuel per run (fleet's default)")
    parser.add_argument("--window", type=float, default=15.0, help="weights: window seconds")
    args = parser.parse_args()
    if args.tenants < 2:
        parser.error("--tenants must be at least 2")
    if args.flood_steps < 3:
        parser.error("--flood-steps must be at least 3")
    if args.hog:
        report = await hog(args)
    elif args.weights:
        report = await weights(args)
    elif args.busy_loops:
        report = await busy_loops(args)
    else:
        report = await placements(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
