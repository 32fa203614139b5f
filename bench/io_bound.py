"""I/O-bound workflows: N workflows of K HTTP steps against a local server that answers slowly.

A local HTTP/1.1 server (127.0.0.1, a thread of its own) answers every request after
--delay-ms and counts the requests in flight (peak) and in all. The tenant's allow list names
it, and each workflow runs the playbook example with K `http` ops, one step per call. The whole
burst of creates is published first; the clock runs from the end of the publish (and, also
reported, from the first publish) to the last completion. Runs against the local services in a
database and broker prefix of its own (see harness.py) and prints JSON, per worker count:
workflows/s, steps/s, wall seconds, calls in flight (peak, seen by the server), how long the
burst's first calls took to start, total calls, create-to-complete latency p50/p99 (instances'
created_at to finished_at) and where the workers' time went per delivery (bench/phases.py).
The burst runs twice: the figures are the second run's, on the egress connection pool the first
left, as a busy worker has it; `cold_pool` gives the first run's seconds, peak and spread, when
each call of the burst had to open its connection.

    python bench/io_bound.py [--workflows 200] [--calls 1] [--workers 1,2] [--delay-ms 200]
        [--max-inflight N] [--concurrency 2] [--batch-size 64] [--log-level warning]

--neighbour measures instead whether tenant A's slow calls hold tenant B back: on
--neighbour-workers processes (STEPFLEET_MAX_INFLIGHT and STEPFLEET_TENANT_INFLIGHT set to
--neighbour-inflight), B runs --neighbour-workflows three-step order workflows one at a time on
the idle fleet, then again while A keeps --neighbour-calls one-call workflows outstanding
against the server (answering after --neighbour-delay-ms), topped up every 100 ms as they are
answered; B's second run starts once A's calls are up (or after 60 s) and one delay more. B
is placed in other lanes than A and timed as bench/fairness.py times its victim
(publish to the instance's updated_at). Prints B's idle and loaded p50/p99, the p99 ratio, A's
peak calls in flight (and min/mean while B ran) and A's calls answered while B ran.

    python bench/io_bound.py --neighbour [--neighbour-calls 1000] [--neighbour-delay-ms 2000]
        [--neighbour-workflows 30] [--neighbour-workers 2] [--neighbour-inflight 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, text

from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import TenantLimits, digest_of
from stepfleet.store import PgStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fairness import lanes_of
from harness import AMQP, Deployment, bench_deployment
from phases import per_delivery, snapshot
from throughput import ORDER, percentile, start_workers, stop_workers

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK = ROOT / "guest" / "examples" / "playbook" / "playbook.wasm"
TENANT = "io"
WARMUP_WORKFLOWS = 5
FINAL = ("complete", "errored", "terminated")


class SlowServer:
    """A minimal HTTP/1.1 server (keep-alive) answering `200 ok` after a delay, on a thread and
    event loop of its own so that the benchmark's polling never delays an answer."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.port = 0
        self._lock = threading.Lock()
        self._in_flight = 0
        self._peak = 0
        self._total = 0
        self._answered = 0
        self._arrivals: list[float] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise SystemExit("the HTTP server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def take_counts(self) -> tuple[int, int]:
        """(peak requests in flight, requests) since the last call; both start again at 0."""
        with self._lock:
            counts = (self._peak, self._total)
            self._peak, self._total = self._in_flight, 0
            self._arrivals = []
        return counts

    def spread_ms(self, first: int) -> float:
        """Milliseconds from the first request to the `first`-th since `take_counts`."""
        with self._lock:
            arrivals = self._arrivals[:first]
        return round((arrivals[-1] - arrivals[0]) * 1000, 1) if arrivals else 0.0

    def snapshot(self) -> tuple[int, int]:
        """(requests in flight now, requests answered or abandoned since the start); resets
        nothing."""
        with self._lock:
            return self._in_flight, self._answered

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self._loop.create_server(
            lambda: _SlowConnection(self), "127.0.0.1", 0, backlog=1024
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    def arrived(self) -> None:
        with self._lock:
            self._arrivals.append(time.monotonic())
            self._in_flight += 1
            self._total += 1
            self._peak = max(self._peak, self._in_flight)

    def left(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._answered += 1


_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"


class _SlowConnection(asyncio.Protocol):
    """One client connection of `SlowServer`: each request (keep-alive, pipelined or not) is
    answered `delay_s` after it arrived, by a timer, with no task or stream per request: the
    server shares the machine with the workers it measures, so it is kept cheap."""

    def __init__(self, server: SlowServer) -> None:
        self._server = server
        self._buffer = b""
        self._body_left = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._body_left:
                taken = min(self._body_left, len(self._buffer))
                self._buffer, self._body_left = self._buffer[taken:], self._body_left - taken
                if self._body_left:
                    return
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > 65536:  # not HTTP this server speaks
                    self._close()
                return
            head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4 :]
            self._request(head)

    def _request(self, head: str) -> None:
        request_line, *lines = head.split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines if line)
        }
        self._body_left = int(headers.get("content-length", "0") or 0)
        close = headers.get("connection", "").lower() == "close" or request_line.endswith(
            "HTTP/1.0"
        )
        self._server.arrived()
        asyncio.get_running_loop().call_later(self._server.delay_s, self._answer, close)

    def _answer(self, close: bool) -> None:
        self._server.left()
        if self._transport is None or self._transport.is_closing():
            return  # the client went away
        self._transport.write(_OK + (b"Connection: close\r\n\r\nok" if close else b"\r\nok"))
        if close:
            self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


@dataclass(frozen=True)
class Finished:
    """What the store says of one instance once it is final."""

    status: str
    output: Any
    created_at: datetime
    finished_at: datetime


def _read_final(connection: Connection, ids: list[str]) -> dict[str, Finished]:
    rows = connection.execute(
        text(
            "SELECT id, status, output, created_at, finished_at FROM instances "
            "WHERE tenant = :tenant AND id = ANY(:ids) AND status = ANY(:final)"
        ),
        {"tenant": TENANT, "ids": ids, "final": list(FINAL)},
    ).all()
    return {
        row.id: Finished(
            row.status, json.loads(row.output or "null"), row.created_at, row.finished_at
        )
        for row in rows
    }


def _count_final(connection: Connection, ids: list[str]) -> int:
    return int(
        connection.execute(
            text(
                "SELECT count(*) FROM instances "
                "WHERE tenant = :tenant AND id = ANY(:ids) AND status = ANY(:final)"
            ),
            {"tenant": TENANT, "ids": ids, "final": list(FINAL)},
        ).scalar_one()
    )


async def wait_final(url: str, ids: list[str]) -> dict[str, Finished]:
    """Wait until every instance is final, then read them all. The figures come from the
    rows' own times, so the poll (off the event loop, on one connection) only counts, every
    250 ms: reading every finished row and its output twenty times a second took a sixth of
    the machine's CPU, from the workers it measures."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            while True:
                done = await asyncio.to_thread(_count_final, connection, ids)
                connection.commit()
                if done == len(ids):
                    return await asyncio.to_thread(_read_final, connection, ids)
                await asyncio.sleep(0.25)
    finally:
        engine.dispose()


def check_calls(done: dict[str, Finished], calls: int) -> None:
    """Every workflow completed and every call was answered 200: else the figures mean little."""
    for instance_id, finished in done.items():
        if finished.status != "complete":
            raise SystemExit(f"workflow {instance_id} ended {finished.status}")
        answers = [finished.output.get(f"call-{j}", {}) for j in range(calls)]
        failed = [a for a in answers if a.get("status") != 200]
        if failed:
            raise SystemExit(f"workflow {instance_id}: a call was not answered 200: {failed[0]}")


def rates(workflows: int, steps: int, seconds: float) -> dict[str, float]:
    return {
        "seconds": round(seconds, 3),
        "workflows_per_s": round(workflows / seconds, 2),
        "steps_per_s": round(steps / seconds, 2),
    }


async def run_burst(
    deployment: Deployment, server: SlowServer, workflows: int, calls: int
) -> dict[str, object]:
    """Publish `workflows` creates at once, wait for them all, and measure."""
    target = f"http://127.0.0.1:{server.port}/x"
    params = {"ops": [{"op": "http", "name": f"call-{j}", "url": target} for j in range(calls)]}
    ids = [f"io-{uuid.uuid4().hex[:16]}" for _ in range(workflows)]
    requests = [CreateRequest(TENANT, deployment.digest, params, i) for i in ids]
    server.take_counts()
    async with Producer(AMQP, deployment.topology) as producer:
        first_publish = datetime.now(UTC)
        for offset in range(0, workflows, 500):
            await producer.create_batch(requests[offset : offset + 500])
        burst_published = datetime.now(UTC)
    done = await wait_final(deployment.url, ids)
    spread = server.spread_ms(workflows)
    peak, total = server.take_counts()
    check_calls(done, calls)
    last = max(f.finished_at for f in done.values())
    latencies = [(f.finished_at - f.created_at).total_seconds() * 1000 for f in done.values()]
    steps = workflows * calls
    return {
        "workflows": workflows,
        "steps": steps,
        "publish_seconds": round((burst_published - first_publish).total_seconds(), 3),
        "after_burst": rates(workflows, steps, (last - burst_published).total_seconds()),
        "from_first_publish": rates(workflows, steps, (last - first_publish).total_seconds()),
        "calls_in_flight_peak": peak,
        "first_calls_spread_ms": spread,
        "calls_total": total,
        "latency_ms_p50": round(percentile(latencies, 0.50), 1),
        "latency_ms_p99": round(percentile(latencies, 0.99), 1),
    }


async def allow_server(deployment: Deployment, port: int) -> None:
    """Add the tenant and put the server on its egress allow list (workers read it at start)."""
    await deployment.limit(TENANT, TenantLimits())
    store = PgStore(deployment.url, pool_size=1)
    try:
        await store.tenants.allow_host(TENANT, f"127.0.0.1:{port}")
    finally:
        await store.close()


class Flood:
    """Tenant A's continuous flood: one-call workflows published so that about `target` of
    them are outstanding (published, their call not answered yet) until stopped; samples the
    server's calls in flight every 100 ms."""

    def __init__(self, deployment: Deployment, server: SlowServer, target: int) -> None:
        self.deployment = deployment
        self.server = server
        self.target = target
        self.ids: list[str] = []
        self.samples: list[tuple[float, int]] = []
        """(loop time, calls in flight) every 100 ms."""
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        url = f"http://127.0.0.1:{self.server.port}/x"
        params = {"ops": [{"op": "http", "name": "call-0", "url": url}]}
        _, answered_before = self.server.snapshot()
        async with Producer(AMQP, self.deployment.topology) as producer:
            while not self._stop.is_set():
                in_flight, answered = self.server.snapshot()
                self.samples.append((loop.time(), in_flight))
                missing = self.target - (len(self.ids) - (answered - answered_before))
                for offset in range(0, max(0, missing), 500):
                    ids = [f"io-{uuid.uuid4().hex[:16]}" for _ in range(min(500, missing - offset))]
                    await producer.create_batch(
                        [CreateRequest(TENANT, self.deployment.digest, params, i) for i in ids]
                    )
                    self.ids += ids
                await asyncio.sleep(0.1)


async def neighbour_tenant(deployment: Deployment) -> str:
    """A tenant for B whose create and step lanes are not A's (as bench/fairness.py picks)."""
    a = await lanes_of(deployment.broker, deployment.topology, TENANT)
    taken = {a.create, a.step}
    for attempt in range(100):
        tenant = f"calm{attempt}"
        b = await lanes_of(deployment.broker, deployment.topology, tenant)
        if not {b.create, b.step} & taken:
            return tenant
    raise SystemExit("no tenant found whose lanes are not the flooder's")


async def run_one_at_a_time(
    producer: Producer, deployment: Deployment, tenant: str, digest: str, count: int
) -> list[float]:
    """B's three-step order workflows, each created once the previous one completed:
    create-to-complete milliseconds as bench/fairness.py measures its victim (publish time to
    the instance's updated_at once complete)."""
    measured: list[float] = []
    for i in range(count):
        instance_id = f"b-{uuid.uuid4().hex[:16]}"
        params = {"order_id": f"B-{i}", "amount": 4200, "items": 3}
        published = datetime.now(UTC)
        await producer.create(CreateRequest(tenant, digest, params, instance_id))
        measured += await asyncio.wait_for(
            latencies(deployment.url, tenant, {instance_id: published}), timeout=120
        )
    return measured


async def latencies(url: str, tenant: str, published: dict[str, datetime]) -> list[float]:
    """Milliseconds from each instance's publish to its completion (its updated_at)."""
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


def p50_p99(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5), 1), "p99": round(percentile(values, 0.99), 1)}


async def run_neighbour(args: argparse.Namespace) -> dict[str, object]:
    """Tenant B's latency, one workflow at a time, on an idle fleet and while tenant A keeps
    `--neighbour-calls` slow calls in flight."""
    delay_s = args.neighbour_delay_ms / 1000
    server = SlowServer(delay_s)
    server.start()
    order = await asyncio.to_thread(ORDER.read_bytes)
    order_digest = digest_of(order)
    try:
        async with bench_deployment(PLAYBOOK) as deployment:
            await deployment.push(TENANT)
            await allow_server(deployment, server.port)
            calm = await neighbour_tenant(deployment)
            store = PgStore(deployment.url, pool_size=1)
            try:
                await store.put_module(calm, order_digest, order)
            finally:
                await store.close()
            env = {
                **deployment.env,
                "STEPFLEET_LOG_LEVEL": args.log_level,
                "STEPFLEET_CONCURRENCY": str(args.concurrency),
                "STEPFLEET_BATCH_SIZE": str(args.batch_size),
                "STEPFLEET_EGRESS_TIMEOUT_SECONDS": str(max(10.0, 2 * delay_s + 5)),
                "STEPFLEET_HEALTH_FILE": "",
                "STEPFLEET_MAX_INFLIGHT": str(args.neighbour_inflight),
                "STEPFLEET_TENANT_INFLIGHT": str(args.neighbour_inflight),
            }
            workers = start_workers(args.neighbour_workers, env)
            try:
                async with Producer(AMQP, deployment.topology) as producer:
                    # Warm: connections, both compiled modules, the egress pools.
                    await run_burst(deployment, server, WARMUP_WORKFLOWS, 1)
                    await run_one_at_a_time(producer, deployment, calm, order_digest, 5)
                    idle = await run_one_at_a_time(
                        producer, deployment, calm, order_digest, args.neighbour_workflows
                    )
                    flood = Flood(deployment, server, args.neighbour_calls)
                    flooding = asyncio.create_task(flood.run())
                    loop = asyncio.get_running_loop()
                    ramp_start = loop.time()
                    # Measure once A's calls are up (or after 60 s, whatever they reached).
                    while server.snapshot()[0] < 0.95 * args.neighbour_calls:
                        if flooding.done() or loop.time() - ramp_start > 60:
                            break
                        await asyncio.sleep(0.1)
                    # Then one delay more, so that A's calls are being answered and replaced
                    # (a steady flood, not only the first wave waiting) while B runs.
                    await asyncio.sleep(delay_s)
                    ramp_seconds = loop.time() - ramp_start
                    server.take_counts()
                    _, answered_before = server.snapshot()
                    measure_start = loop.time()
                    loaded = await run_one_at_a_time(
                        producer, deployment, calm, order_digest, args.neighbour_workflows
                    )
                    measure_end = loop.time()
                    peak, _ = server.take_counts()
                    _, answered_after = server.snapshot()
                    flood.stop()
                    await flooding
                # Let A's last calls finish: every one must have been answered 200.
                check_calls(await wait_final(deployment.url, flood.ids), 1)
            finally:
                stop_workers(workers)
    finally:
        server.stop()
    during = [n for t, n in flood.samples if measure_start <= t <= measure_end]
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            "workers": args.neighbour_workers,
            "delay_ms": args.neighbour_delay_ms,
            "a_calls_target": args.neighbour_calls,
            "max_inflight_and_tenant_inflight": args.neighbour_inflight,
            "b_workflows": args.neighbour_workflows,
            "concurrency": args.concurrency,
            "batch_size": args.batch_size,
            "log_level": args.log_level,
        },
        "b_idle_ms": p50_p99(idle),
        "b_loaded_ms": p50_p99(loaded),
        "ratio_p99": round(percentile(loaded, 0.99) / percentile(idle, 0.99), 2),
        "a_ramp_seconds": round(ramp_seconds, 1),
        "a_calls_in_flight_peak": peak,
        "a_calls_in_flight_during": {
            "min": min(during, default=0),
            "mean": round(sum(during) / len(during), 1) if during else 0,
        },
        "a_calls_completed_during": answered_after - answered_before,
        "measure_seconds": round(measure_end - measure_start, 1),
        "a_workflows_published": len(flood.ids),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--calls", type=int, default=1, help="HTTP steps per workflow")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker process counts")
    parser.add_argument("--delay-ms", type=int, default=200, help="the server's answer delay")
    parser.add_argument("--max-inflight", type=int, help="STEPFLEET_MAX_INFLIGHT for the workers")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="also sets the prefetch (2 x concurrency x this)"
    )
    parser.add_argument("--log-level", default="warning")
    neighbour = parser.add_argument_group("neighbour mode")
    neighbour.add_argument(
        "--neighbour",
        action="store_true",
        help="tenant B's latency while tenant A keeps --neighbour-calls slow calls in flight",
    )
    neighbour.add_argument("--neighbour-calls", type=int, default=1000)
    neighbour.add_argument("--neighbour-delay-ms", type=int, default=2000)
    neighbour.add_argument("--neighbour-workflows", type=int, default=30, help="B's, per phase")
    neighbour.add_argument("--neighbour-workers", type=int, default=2)
    neighbour.add_argument(
        "--neighbour-inflight",
        type=int,
        default=600,
        help="STEPFLEET_MAX_INFLIGHT and STEPFLEET_TENANT_INFLIGHT for the workers",
    )
    args = parser.parse_args()
    if args.neighbour:
        print(json.dumps(await run_neighbour(args), indent=2))
        return
    if args.workflows < 1 or not 1 <= args.calls <= 1000:
        parser.error("--workflows must be at least 1 and --calls from 1 to 1000")

    delay_s = args.delay_ms / 1000
    server = SlowServer(delay_s)
    server.start()
    settings: dict[str, object] = {
        "delay_ms": args.delay_ms,
        "calls_per_workflow": args.calls,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "max_inflight": args.max_inflight,
        "log_level": args.log_level,
    }
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": settings,
        # The wall time if the fleet made its calls one at a time, for comparison.
        "serial_call_seconds": round(args.workflows * args.calls * delay_s, 3),
    }
    try:
        async with bench_deployment(PLAYBOOK) as deployment:
            await deployment.push(TENANT)
            await allow_server(deployment, server.port)
            env = {
                **deployment.env,
                "STEPFLEET_LOG_LEVEL": args.log_level,
                "STEPFLEET_CONCURRENCY": str(args.concurrency),
                "STEPFLEET_BATCH_SIZE": str(args.batch_size),
                # A call must not time out before the server answers.
                "STEPFLEET_EGRESS_TIMEOUT_SECONDS": str(max(10.0, 2 * delay_s + 5)),
                "STEPFLEET_HEALTH_FILE": "",
            }
            if args.max_inflight is not None:
                env["STEPFLEET_MAX_INFLIGHT"] = str(args.max_inflight)
            for count in [int(c) for c in args.workers.split(",")]:
                workers = start_workers(count, env)
                try:
                    # Warm: connections, the compiled module, the caches.
                    await run_burst(deployment, server, WARMUP_WORKFLOWS, 1)
                    # The same burst twice: first on an egress pool with a few connections
                    # (each call of the burst opens one), then on the pool that burst left
                    # (connections stay open 5 s), as a worker that is busy has it.
                    cold = await run_burst(deployment, server, args.workflows, args.calls)
                    before = await snapshot(workers)
                    burst = await run_burst(deployment, server, args.workflows, args.calls)
                    after = await snapshot(workers)
                    report[f"load_{count}_workers"] = {
                        **burst,
                        "phases": per_delivery(before, after),
                        "cold_pool": {
                            "after_burst_seconds": cold["after_burst"]["seconds"],
                            "calls_in_flight_peak": cold["calls_in_flight_peak"],
                            "first_calls_spread_ms": cold["first_calls_spread_ms"],
                        },
                    }
                finally:
                    stop_workers(workers)
    finally:
        server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
