"""A sleeping workflow outlives restarts of PostgreSQL and RabbitMQ under a running worker.

The test restarts the machine's own services (as the env documents), waits for them to come
back, and leaves them running.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from stepfleet.schemas import InstanceStatus, digest_of
from tests.integration.test_faults import publish_orders, wait_complete
from tests.integration.test_primitives import (
    WEEK_MS,
    bring_timer_forward,
    finished,
    output,
    reached,
)

pytestmark = [pytest.mark.services, pytest.mark.restarts]

PG_VERSIONS = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").exists() else []


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _run(*command: str) -> None:
    await asyncio.to_thread(subprocess.run, command, check=True, capture_output=True, timeout=120)


async def _wait_port(port: int, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _port_open(port):
        if loop.time() > deadline:
            raise AssertionError(f"port {port} did not come back in {timeout}s")
        await asyncio.sleep(0.2)


@pytest.mark.skipif(
    not PG_VERSIONS or shutil.which("pg_ctlcluster") is None or shutil.which("rabbitmqctl") is None,
    reason="needs the machine's own PostgreSQL cluster and RabbitMQ node to restart",
)
async def test_week_long_sleep_survives_postgresql_and_rabbitmq_restarts(
    store, start_worker, playbook
):
    await start_worker(wake_resend_seconds=1.0)
    key = await playbook({"op": "sleep", "name": "week", "ms": WEEK_MS}, {"op": "now", "name": "t"})
    await reached(store, key, InstanceStatus.SLEEPING)

    version = PG_VERSIONS[-1].name
    await _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart")
    await _wait_port(5432)
    await _run("rabbitmqctl", "stop_app")
    await _run("rabbitmqctl", "start_app")
    await _wait_port(5672)

    await bring_timer_forward(store, key)
    assert output(await finished(store, key, timeout=90))["week"] is True


@pytest.mark.skipif(
    not PG_VERSIONS or shutil.which("pg_ctlcluster") is None or shutil.which("rabbitmqctl") is None,
    reason="needs the machine's own PostgreSQL cluster and RabbitMQ node to restart",
)
@pytest.mark.parametrize("service", ["postgresql", "rabbitmq"])
async def test_the_fleet_recovers_from_a_restart_under_load(
    settings, topology, store, start_worker, order_wasm, service
):
    """A service restarts while a few hundred workflows run; the worker reconnects by itself
    and every workflow completes with each step journaled once."""
    tenant = f"restart{uuid.uuid4().hex[:8]}"
    digest = digest_of(order_wasm)
    await store.put_module(tenant, digest, order_wasm)
    await start_worker(wake_resend_seconds=1.0, outbox_relay_after_seconds=1.0)
    count = 300
    await publish_orders(settings, topology, tenant, digest, count)
    await asyncio.sleep(0.5)  # mid-run
    if service == "postgresql":
        version = PG_VERSIONS[-1].name
        await _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart")
        await _wait_port(5432)
    else:
        await _run("rabbitmqctl", "stop_app")
        await _run("rabbitmqctl", "start_app")
        await _wait_port(5672)
    report = await wait_complete(store, tenant, count, 90)
    print(f"\n{service} restarted under load:", report)
    assert report["complete"] == count, report
    assert report["entries"] == count * 3
    assert report["repeated_steps"] == 0
