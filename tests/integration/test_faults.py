"""Nothing is lost: workers killed with SIGKILL at random moments (and at the crash points
between commit and publish, and between publish and ack), a flood of malformed messages, and
graceful stops. Every workflow completes and each step is journaled exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from stepfleet.broker import Outgoing
from stepfleet.cli.main import app
from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import digest_of
from stepfleet.store import LetterFilter
from tests.conftest import ORDER_PARAMS

pytestmark = pytest.mark.services

STEPS = ("reserve", "charge", "ship")


def worker_env(settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "STEPFLEET_DATABASE_URL": settings.database_url,
        "STEPFLEET_AMQP_URL": settings.amqp_url,
        "STEPFLEET_PREFIX": settings.prefix,
        "STEPFLEET_LOG_LEVEL": "warning",
        "STEPFLEET_HEALTH_FILE": "",
        "STEPFLEET_OUTBOX_RELAY_AFTER_SECONDS": "1",
        "STEPFLEET_MODULE_CACHE_DIR": "",
        **extra,
    }


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "stepfleet", "worker"], env=env, stdout=sink, stderr=sink
        )


async def publish_orders(settings, topology, tenant: str, digest: str, count: int) -> list[str]:
    requests = [
        CreateRequest(tenant, digest, {**ORDER_PARAMS, "order_id": f"F-{i}"}, f"f-{i}-{uuid.uuid4().hex[:6]}")
        for i in range(count)
    ]  # fmt: skip
    async with Producer(settings.amqp_url, topology) as producer:
        return await producer.create_batch(requests)


async def journal_report(store, tenant: str) -> dict[str, int]:
    async with store._engine.connect() as connection:
        complete = (
            await connection.execute(
                text("SELECT count(*) FROM instances WHERE tenant = :t AND status = 'complete'"),
                {"t": tenant},
            )
        ).scalar_one()
        entries = (
            await connection.execute(
                text("SELECT count(*) FROM journal WHERE tenant = :t"), {"t": tenant}
            )
        ).scalar_one()
        repeated = (
            await connection.execute(
                text(
                    "SELECT count(*) FROM (SELECT instance_id, name FROM journal WHERE tenant = :t "
                    "GROUP BY instance_id, name HAVING count(*) > 1) AS twice"
                ),
                {"t": tenant},
            )
        ).scalar_one()
    return {"complete": complete, "entries": entries, "repeated_steps": repeated}


async def wait_complete(store, tenant: str, count: int, timeout: float) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        report = await journal_report(store, tenant)
        if report["complete"] == count or loop.time() > deadline:
            return report
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)  # a pass takes ~15 s; the loop below allows up to 120 s
async def test_workers_killed_at_random_lose_nothing(
    settings, topology, broker, store, order_wasm, tmp_path
):
    """SIGKILL from outside at random moments plus crash points inside (after commit, after
    publish); a supervisor restarts dead workers. Every workflow completes, once."""
    tenant = f"chaos{uuid.uuid4().hex[:8]}"
    digest = digest_of(order_wasm)
    await store.put_module(tenant, digest, order_wasm)
    env = worker_env(settings, STEPFLEET_CRASH_POINTS="after-commit:0.03,after-publish:0.03")
    log = tmp_path / "workers.log"
    workers = [spawn(env, log) for _ in range(2)]
    count = 300
    await publish_orders(settings, topology, tenant, digest, count)
    kills = restarts = 0
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    try:
        while loop.time() < deadline:
            report = await journal_report(store, tenant)
            if report["complete"] == count:
                break
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            if kills < 6:
                victim = rng.choice(workers)
                if victim.poll() is None:
                    victim.send_signal(signal.SIGKILL)
                    kills += 1
            for index, worker in enumerate(workers):
                if worker.poll() is not None:  # killed, or died at a crash point
                    workers[index] = spawn(env, log)
                    restarts += 1
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)
    report = await journal_report(store, tenant)
    crash_points = log.read_text(errors="replace").count("stepfleet: crash point")
    letters = await store.dead_letters.find(LetterFilter(tenant=tenant, include_replayed=True))
    print(
        "\nfault injection:",
        json.dumps(
            {
                "workflows": count,
                "sigkill_from_outside": kills,
                "crash_points_hit": crash_points,
                "worker_restarts": restarts,
                **report,
                "dead_letters": len(letters),
            }
        ),
    )
    assert kills > 0
    assert report["complete"] == count, report
    assert report["entries"] == count * len(STEPS)
    assert report["repeated_steps"] == 0
    assert letters == []


async def test_a_flood_of_malformed_messages_is_archived_while_valid_work_completes(
    settings, topology, broker, store, start_worker, order_wasm
):
    tenant = f"flood{uuid.uuid4().hex[:8]}"
    digest = digest_of(order_wasm)
    await store.put_module(tenant, digest, order_wasm)
    worker = await start_worker()
    base = {"x-tenant": tenant, "x-kind": "create", "x-schema-version": "1", "x-module": digest}
    kinds = {
        "bad-body": ({**base}, b"{not json"),
        "missing-header": ({k: v for k, v in base.items() if k != "x-kind"}, b"{}"),
        "bad-header": ({**base, "x-kind": "launch"}, b"{}"),
        "unknown-module": ({**base, "x-module": "sha256:" + "f" * 64}, b"{}"),
        "unsupported-version": ({**base, "x-schema-version": "9"}, b"{}"),
    }
    malformed: dict[str, str] = {}
    messages = []
    for i in range(200):
        reason = list(kinds)[i % len(kinds)]
        headers, body = kinds[reason]
        instance_id = f"bad-{i}-{uuid.uuid4().hex[:6]}"
        malformed[instance_id] = reason
        messages.append(
            Outgoing(
                topology.ingress_exchange,
                f"{tenant}.create",
                body,
                {**headers, "x-instance-id": instance_id},
                instance_id,
                "guest",
            )
        )
    valid = await publish_orders(settings, topology, tenant, digest, 200)
    rng = random.Random(3)
    rng.shuffle(messages)
    await broker.publish_many(messages)
    report = await wait_complete(store, tenant, len(valid), 60)
    assert report["complete"] == len(valid)
    assert report["repeated_steps"] == 0
    for _ in range(150):
        letters = await store.dead_letters.find(LetterFilter(tenant=tenant))
        if len(letters) >= len(malformed):
            break
        await asyncio.sleep(0.1)
    by_instance = {letter.instance_id: letter.reason for letter in letters}
    assert by_instance == malformed
    assert worker.ready.is_set()
    assert worker.steps_done >= len(valid) * 4


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_a_stopped_worker_finishes_in_flight_steps_and_exits_0(
    settings, topology, store, start_worker, order_wasm, tmp_path, stop_signal
):
    tenant = f"stop{uuid.uuid4().hex[:8]}"
    digest = digest_of(order_wasm)
    await store.put_module(tenant, digest, order_wasm)
    health = tmp_path / "worker.health"
    worker = spawn(worker_env(settings, STEPFLEET_HEALTH_FILE=str(health)), tmp_path / "w.log")
    try:
        for _ in range(100):
            if health.exists():
                break
            await asyncio.sleep(0.1)
        runner = CliRunner()
        ready = await asyncio.to_thread(runner.invoke, app, ["health", "--file", str(health)])
        assert ready.exit_code == 0, ready.output
        assert "ready" in ready.output
        await publish_orders(settings, topology, tenant, digest, 100)
        await asyncio.sleep(0.3)
        worker.send_signal(stop_signal)
        code = await asyncio.to_thread(worker.wait, 45)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert code == 0
    stopped = await asyncio.to_thread(runner.invoke, app, ["health", "--file", str(health)])
    assert stopped.exit_code == 1
    assert "stopped" in stopped.output
    await start_worker()  # whatever the stopped worker had not taken
    report = await wait_complete(store, tenant, 100, 60)
    assert report["complete"] == 100
    assert report["repeated_steps"] == 0
