"""The fleet survives a RabbitMQ cluster node going down under load.

The test starts a three-node RabbitMQ cluster of its own on this machine (nodes
`sfc<id>-1@localhost` to `-3`, ports it checks are free, data, logs and the Erlang cookie in a
temporary directory; the machine's own node is not touched), declares the fleet's topology on
it, runs a worker pointed at all three nodes (STEPFLEET_AMQP_URL with three URLs) and a few
hundred three-step workflows, stops the node the worker is connected to while steps are in
flight, starts it again, and checks that every workflow completed with each step journaled
exactly once. The cluster is stopped and its directory removed even when the test fails.

When the cluster cannot be formed here (no RabbitMQ scripts, a node that does not boot), the
test is skipped with the reason: that is the environment, not the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from stepfleet.broker import Broker
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import digest_of
from stepfleet.store import PgStore
from stepfleet.workers.settings import Settings
from stepfleet.workers.worker import Worker
from tests.conftest import ORDER_PARAMS

pytestmark = [pytest.mark.services, pytest.mark.cluster]

WORKFLOWS = 500
TENANTS = [f"cluster{i}" for i in range(6)]  # spread over several lanes
STEPS = 3  # reserve, charge, ship


class ClusterUnavailable(Exception):
    """The cluster could not be formed on this machine."""


def _scripts_dir() -> Path | None:
    """RabbitMQ's own scripts (rabbitmq-server, rabbitmqctl and rabbitmq-env side by side).

    Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the rabbitmq user and its
    home (and so its cookie); the scripts it wraps take the environment as it is.
    """
    candidates = [os.environ.get("STEPFLEET_TEST_RABBITMQ_SCRIPTS", ""), "/usr/lib/rabbitmq/bin"]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate)
        if all(
            (path / name).is_file() for name in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-env")
        ):
            return path
    return None


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))  # noqa: S104 - only probing that the port is free
        except OSError:
            return False
    return True


def _pick_ports() -> tuple[list[int], list[int], tuple[int, int]]:
    """Three AMQP ports, three distribution ports and a CLI range, all free (not 5672/25672)."""
    for base in range(26700, 29700, 100):
        amqp = [base + 1, base + 2, base + 3]
        dist = [base + 11, base + 12, base + 13]
        ctl = (base + 20, base + 30)
        if all(_free(p) for p in [*amqp, *dist, *range(ctl[0], ctl[1] + 1)]):
            return amqp, dist, ctl
    raise ClusterUnavailable("no free block of ports between 26700 and 29700")


@dataclass
class Node:
    name: str
    port: int
    dist_port: int
    base: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    def log_tail(self, lines: int = 15) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        text_ = "\n".join(p.read_text(errors="replace") for p in logs)
        return "\n".join(text_.splitlines()[-lines:])


class Cluster:
    """Three RabbitMQ nodes of this test's own, driven with rabbitmq-server and rabbitmqctl."""

    def __init__(self, scripts: Path, root: Path) -> None:
        self.scripts = scripts
        self.root = root
        self.home = root / "home"  # HOME of the nodes and of rabbitmqctl: the cookie
        self.home.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (root / "enabled_plugins").write_text("[rabbitmq_consistent_hash_exchange].\n")
        (root / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
        amqp, dist, self.ctl_ports = _pick_ports()
        tag = uuid.uuid4().hex[:6]
        self.nodes = [
            Node(f"sfc{tag}-{i + 1}@localhost", amqp[i], dist[i], root / f"n{i + 1}")
            for i in range(3)
        ]
        for node in self.nodes:
            (node.base / "mnesia").mkdir(parents=True)
            (node.base / "log").mkdir()
            (node.base / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{node.port}\n"
                "loopback_users = none\n"
                "disk_free_limit.absolute = 1MB\n"
            )

    def env(self, node: Node | None = None) -> dict[str, str]:
        """The environment of rabbitmqctl, or of `node`'s server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(self.home),
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_CTL_DIST_PORT_MIN=str(self.ctl_ports[0]),
            RABBITMQ_CTL_DIST_PORT_MAX=str(self.ctl_ports[1]),
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.base / "log"),
                RABBITMQ_PID_FILE=str(node.pid_file),
                RABBITMQ_CONFIG_FILE=str(node.base / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(node.base / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            )
        return env

    def ctl(
        self, node: Node, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `rabbitmqctl -n node ARGS`."""
        result = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", node.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} failed: "
                f"{(result.stderr or result.stdout).strip()[-800:]}"
            )
        return result

    def _start_server(self, node: Node) -> None:
        result = subprocess.run(
            [str(self.scripts / "rabbitmq-server"), "-detached"],
            env=self.env(node),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise ClusterUnavailable(
                f"rabbitmq-server -detached failed for {node.name}: "
                f"{(result.stderr or result.stdout).strip()[-800:]}"
            )

    def _await_startup(self, node: Node, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # Fails at once while the node is not yet registered with epmd: try again.
            result = self.ctl(node, "await_startup", "--timeout", "30", check=False, timeout=45)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ClusterUnavailable(
                    f"{node.name} did not boot in {timeout:.0f}s: "
                    f"{(result.stderr or result.stdout).strip()[-300:]}\n"
                    f"log:\n{node.log_tail()}"
                )
            time.sleep(0.5)

    def start(self) -> None:
        """Boot the three nodes side by side, then join nodes 2 and 3 to node 1."""
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(self._start_server, self.nodes))
            list(pool.map(self._await_startup, self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            try:
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
            except RuntimeError as exc:
                raise ClusterUnavailable(f"{node.name} could not join: {exc}") from exc
        status = json.loads(self.ctl(first, "cluster_status", "--formatter", "json").stdout)
        running = set(status.get("running_nodes", []))
        if running != {n.name for n in self.nodes}:
            raise ClusterUnavailable(f"the cluster did not form: running {sorted(running)}")

    def queues(self, node: Node) -> dict[str, dict[str, Any]]:
        """The queues as `node` sees them: name -> members, online members, messages..."""
        out = self.ctl(
            node,
            "list_queues",
            "name",
            "members",
            "online",
            "leader",
            "messages_ready",
            "messages_unacknowledged",
            "messages",
            "consumers",
            "--formatter",
            "json",
        ).stdout
        return {q["name"]: q for q in json.loads(out)}

    def _stop(self, node: Node) -> None:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int(node.pid_file.read_text().strip())
        with contextlib.suppress(Exception):
            self.ctl(node, "stop", timeout=60, check=False)
        if pid is None:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.2)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # our own node's VM, by its pid file

    def stop(self) -> None:
        """Stop every node (whatever state it is in)."""
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(self._stop, self.nodes))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A running three-node cluster, stopped and removed afterwards."""
    scripts = _scripts_dir()
    if scripts is None:
        pytest.skip("RabbitMQ's scripts (rabbitmq-server, rabbitmqctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="stepfleet-cluster-"))
    made: Cluster | None = None
    try:
        made = Cluster(scripts, root)
        started = time.monotonic()
        try:
            made.start()
        except (ClusterUnavailable, subprocess.TimeoutExpired, OSError) as exc:
            pytest.skip(f"cannot start a RabbitMQ cluster on this machine: {exc}")
        print(f"cluster formed in {time.monotonic() - started:.1f}s")
        yield made
    except ClusterUnavailable as exc:
        pytest.skip(f"cannot start a RabbitMQ cluster on this machine: {exc}")
    finally:
        if made is not None:
            made.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _rows(store: PgStore, sql: str, **params: Any) -> list[Any]:
    # The machine's PostgreSQL may restart under us (another test's business); the worker
    # rides it out, and so does the test's polling.
    for attempt in range(40):
        try:
            async with store._engine.connect() as connection:
                return list(await connection.execute(text(sql), params))
        except OperationalError:
            if attempt == 39:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def _scalar(store: PgStore, sql: str, **params: Any) -> Any:
    [(value, *_)] = await _rows(store, sql, **params)
    return value


async def _wait(condition: Any, timeout: float, what: str, poll: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        await asyncio.sleep(poll)


async def _queue_counts(node: Node, names: list[str]) -> dict[str, tuple[int, int]]:
    """Messages and consumers of each queue, from queue.declare (list_queues' are sampled)."""
    connection = await aiormq.connect(node.url)
    try:
        channel = await connection.channel()
        counts = {}
        for name in names:
            ok = await channel.queue_declare(name, passive=True)
            counts[name] = (int(ok.message_count or 0), int(ok.consumer_count or 0))
        return counts
    finally:
        await connection.close()


async def _state(store: PgStore, node: Node, names: list[str]) -> str:
    """What is left, for a failure's message: instances by status and wait, outbox, queues."""
    rows = await _rows(
        store,
        "SELECT status, wait_kind, count(*) FROM instances WHERE tenant = ANY(:t) "
        "GROUP BY status, wait_kind",
        t=TENANTS,
    )
    outbox = await _scalar(store, "SELECT count(*) FROM outbox")
    try:
        queues: Any = await _queue_counts(node, names)
    except Exception as exc:
        queues = repr(exc)
    return (
        f"instances {[tuple(r) for r in rows]}, outbox {outbox}, "
        f"queues (messages, consumers) {queues}"
    )


@pytest.mark.timeout(300)  # the waits are generous for loaded machines; a pass takes ~25 s
async def test_the_fleet_survives_a_node_going_down_under_load(
    cluster: Cluster, database_url: str, run_id: str, store: PgStore, order_wasm: bytes
) -> None:
    first = cluster.nodes[0]
    settings = Settings(
        database_url=database_url,
        amqp_url=",".join(node.url for node in cluster.nodes),
        prefix=f"cluster-{run_id}",
        log_level="warning",
        concurrency=2,
        batch_size=8,
        fuel_per_run=200_000_000,
        memory_bytes=16 * 1024 * 1024,
        outbox_relay_after_seconds=2.0,
        shutdown_grace_seconds=5.0,
    )
    topology = settings.topology()
    queue_names = [*topology.work_queues, topology.dead_letter_queue]
    member_names = sorted(n.name for n in cluster.nodes)
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def mark(event: str) -> None:
        timings[event] = time.monotonic() - clock

    # The topology, declared once the cluster has formed: every quorum queue gets a member on
    # each of the 3 nodes (3.10's default initial group size is the whole cluster).
    async with Broker(settings.amqp_url, topology) as declarer:
        await declarer.declare()
    queues = await asyncio.to_thread(cluster.queues, first)
    for name in queue_names:
        assert sorted(queues[name]["members"]) == member_names, name

    digest = digest_of(order_wasm)
    for tenant in TENANTS:
        await store.put_module(tenant, digest, order_wasm)
    requests = [
        CreateRequest(
            TENANTS[i % len(TENANTS)],
            digest,
            {**ORDER_PARAMS, "order_id": f"C-{i}"},
            f"cluster-{i}-{uuid.uuid4().hex[:8]}",
        )
        for i in range(WORKFLOWS)
    ]
    async with Producer(settings.amqp_url, topology) as producer:
        await producer.create_batch(requests)
    mark("published")

    async def journaled() -> int:
        sql = "SELECT count(*) FROM journal WHERE tenant = ANY(:t)"
        return int(await _scalar(store, sql, t=TENANTS))

    async def completed() -> int:
        sql = "SELECT count(*) FROM instances WHERE tenant = ANY(:t) AND status = 'complete'"
        return int(await _scalar(store, sql, t=TENANTS))

    worker = Worker(settings, name="cluster")
    task = asyncio.create_task(worker.run())
    stopped: Node | None = None
    at_stop = at_start = (0, 0)
    try:
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # raises what stopped it
        assert worker.ready.is_set(), "the worker did not start"
        mark("worker ready")
        address = worker.broker.address
        assert address is not None
        stopped = next(n for n in cluster.nodes if f":{n.port}/" in address)

        # Under load: a fifth of the steps journaled, the rest queued or in flight.
        async def under_load() -> bool:
            return await journaled() >= WORKFLOWS * STEPS // 5

        await _wait(under_load, 30, "a fifth of the steps were not journaled")
        at_stop = (await journaled(), await completed())
        assert at_stop[1] < WORKFLOWS, "the load was over before the node went down"
        await asyncio.to_thread(cluster.ctl, stopped, "stop_app")
        mark("node stopped")

        # The worker's connection moves to a surviving node, and steps go on there: more
        # than the deliveries it could hold when the node stopped (8 lanes x prefetch 8).
        async def moved() -> bool:
            now = worker.broker.address
            return now is not None and f":{stopped.port}/" not in now

        await _wait(moved, 40, "the worker did not move to another node")
        after_move = await journaled()

        async def progressing() -> bool:
            return await journaled() >= after_move + 100

        await _wait(progressing, 60, "steps did not go on with the node down")
        mark("100 more steps with the node down")

        await asyncio.to_thread(cluster.ctl, stopped, "start_app")
        at_start = (await journaled(), await completed())
        mark("node started")

        async def all_done() -> bool:
            return await completed() == WORKFLOWS

        try:
            await _wait(all_done, 90, "not every workflow completed", poll=0.2)
        except AssertionError as exc:
            up = next(n for n in cluster.nodes if n is not stopped)
            raise AssertionError(f"{exc}: {await _state(store, up, queue_names)}") from exc
        mark("all complete")
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        if stopped is not None:
            # Leave the node running for the teardown, whatever happened above.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cluster.ctl, stopped, "start_app", check=False)

    # Each step exactly once: no (tenant, instance, seq) twice, every instance 0, 1, 2.
    duplicates = await _rows(
        store,
        "SELECT tenant, instance_id, seq, count(*) FROM journal WHERE tenant = ANY(:t) "
        "GROUP BY tenant, instance_id, seq HAVING count(*) > 1",
        t=TENANTS,
    )
    assert duplicates == []
    per_instance = await _rows(
        store,
        "SELECT i.id, count(j.seq), min(j.seq), max(j.seq) FROM instances i "
        "LEFT JOIN journal j ON j.tenant = i.tenant AND j.instance_id = i.id "
        "WHERE i.tenant = ANY(:t) GROUP BY i.tenant, i.id",
        t=TENANTS,
    )
    assert {row[0] for row in per_instance} == {r.instance_id for r in requests}
    wrong = [tuple(row) for row in per_instance if tuple(row[1:]) != (STEPS, 0, STEPS - 1)]
    assert wrong == []

    # Nothing was dead-lettered by the failover (the worker archives dead letters in
    # PostgreSQL, so look there too), and the stopped node's replicas are back online.
    counts = await _queue_counts(first, queue_names)
    assert counts[topology.dead_letter_queue][0] == 0
    if await _scalar(store, "SELECT to_regclass('dead_letters') IS NOT NULL"):
        sql = "SELECT count(*) FROM dead_letters WHERE tenant = ANY(:t)"
        assert await _scalar(store, sql, t=TENANTS) == 0

    async def replicas_online() -> bool:
        queues = await asyncio.to_thread(cluster.queues, first)
        return all(sorted(queues[name]["online"]) == member_names for name in queue_names)

    await _wait(replicas_online, 20, "the restarted node's replicas did not come back", 0.5)
    mark("replicas online")

    print(
        f"\n{WORKFLOWS} workflows ({WORKFLOWS * STEPS} steps); stopped "
        f"{stopped.name if stopped else '?'} (the worker's node) with {at_stop[0]} steps "
        f"journaled and {at_stop[1]} workflows complete; started it again with {at_start[0]} "
        f"steps and {at_start[1]} complete; "
        + ", ".join(f"{event} {seconds:.1f}s" for event, seconds in timings.items())
    )
