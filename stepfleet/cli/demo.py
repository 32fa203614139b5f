"""`stepfleet demo`: the whole product in one command, on the example tenant workflows."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer

from stepfleet.broker import Broker, Topology
from stepfleet.cli.common import fail, run, say, shown
from stepfleet.client import CreateRequest, EventRequest, Producer
from stepfleet.sandbox import WasmSandbox
from stepfleet.schemas import digest_of
from stepfleet.store import InstanceRecord, PgStore, StoreUnavailable
from stepfleet.store.migrate import ensure_database, upgrade
from stepfleet.workers.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "guest" / "examples"

# (tenant, module file, params for workflow i)
_WORKLOADS: list[tuple[str, str, Callable[[int], dict[str, object]]]] = [
    (
        "acme",
        "order/order.wasm",
        lambda i: {"order_id": f"A-{i}", "amount": 1000 + 100 * i, "items": 1 + i % 4},
    ),
    (
        "globex",
        "greeter/greeter.wasm",
        lambda i: {
            "name": ["Ada", "Grace", "Edsger", "Barbara", "Alan"][i % 5],
            "lang": ["en", "fr", "de"][i % 3],
        },
    ),
    # Sleeps until its reminder is due, then waits up to 2 s for an acknowledgement event.
    (
        "initech",
        "reminder/reminder.wasm",
        lambda i: {"user": f"user-{i}", "delay_ms": 300 * i, "timeout_ms": 2000},
    ),
]
_ACK_TENANT = "initech"
"""The demo acknowledges this tenant's even-numbered reminders; the others time out."""


def run_demo(
    settings: Settings, *, workers: int, per_tenant: int, examples: Path = EXAMPLES
) -> None:
    """Migrate, declare, push, start a fleet, run the examples and print what they returned."""
    started = time.monotonic()
    say(f"1. migrating {settings.database_url.rsplit('@', 1)[-1]}")
    try:
        ensure_database(settings.database_url)
        upgrade(settings.database_url)
    except StoreUnavailable as exc:
        fail(f"PostgreSQL: {exc}")
    topology = settings.topology()
    say(f"2. declaring the RabbitMQ topology {settings.prefix}.*")
    run(_declare(settings, topology))
    say("3. pushing the example tenant modules")
    digests = run(_push(settings, examples))
    say(f"4. starting {workers} worker process(es)")
    fleet = _start_fleet(settings, workers)
    try:
        say(f"5. creating {per_tenant} workflows for each of {len(_WORKLOADS)} tenants")
        records = run(_run_workflows(settings, topology, digests, per_tenant))
    finally:
        say("6. stopping the fleet (SIGTERM: in-flight steps finish first)")
        codes = _stop_fleet(fleet)
    say("")
    for record in records:
        result = record.output if record.output is not None else record.error
        say(
            f"  {record.key.tenant:<8} {record.key.instance_id:<28} {record.status.value:<9} "
            f"{shown(result)}"
        )
    complete = sum(1 for r in records if r.status.value == "complete")
    say(
        f"\n{complete}/{len(records)} workflows complete in {time.monotonic() - started:.1f}s; "
        f"workers exited with {codes}; try: stepfleet status {records[0].key.instance_id}"
    )
    if complete != len(records) or any(codes):
        raise typer.Exit(1)


async def _declare(settings: Settings, topology: Topology) -> None:
    async with Broker(settings.amqp_url, topology) as broker:
        await broker.declare()


async def _push(settings: Settings, examples: Path) -> dict[str, str]:
    sandbox = WasmSandbox(settings.sandbox_limits())
    store = PgStore(settings.database_url, pool_size=1)
    digests: dict[str, str] = {}
    try:
        for tenant, file, _ in _WORKLOADS:
            path = examples / file
            if not path.exists():
                fail(
                    f"{path} is missing: the demo runs from a source checkout (./dev guests rebuilds it)"
                )
            wasm = path.read_bytes()
            sandbox.validate(wasm)
            digests[tenant] = digest_of(wasm)
            await store.put_module(tenant, digests[tenant], wasm)
            say(f"   {tenant:<8} {file:<23} {digests[tenant]}")
    finally:
        await store.close()
    return digests


def _start_fleet(settings: Settings, count: int) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "STEPFLEET_DATABASE_URL": settings.database_url,
        "STEPFLEET_AMQP_URL": settings.amqp_url,
        "STEPFLEET_PREFIX": settings.prefix,
        "STEPFLEET_LOG_LEVEL": "warning",
    }
    return [
        subprocess.Popen([sys.executable, "-m", "stepfleet", "worker"], env=env)
        for _ in range(count)
    ]


def _stop_fleet(fleet: list[subprocess.Popen[bytes]]) -> list[int]:
    for process in fleet:
        process.send_signal(signal.SIGTERM)
    codes = []
    for process in fleet:
        try:
            codes.append(process.wait(timeout=40))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes


async def _run_workflows(
    settings: Settings, topology: Topology, digests: dict[str, str], per_tenant: int
) -> list[InstanceRecord]:
    run_tag = time.strftime("%H%M%S")
    requests = [
        CreateRequest(tenant, digests[tenant], params(i), f"demo-{run_tag}-{tenant}-{i}")
        for tenant, _, params in _WORKLOADS
        for i in range(per_tenant)
    ]
    store = PgStore(settings.database_url, pool_size=1)
    async with Producer(settings.amqp_url, topology) as producer:
        await producer.create_batch(requests)
        await _acknowledge(store, producer, [r for r in requests if r.tenant == _ACK_TENANT])
    try:
        deadline = time.monotonic() + 60
        while True:
            records = []
            for request in requests:
                assert request.instance_id is not None
                found = await store.find_instances(request.instance_id, request.tenant)
                if found:
                    records.append(found[0][0])
            if len(records) == len(requests) and all(r.status.is_final for r in records):
                return records
            if time.monotonic() > deadline:
                pending = [r.key for r in records if not r.status.is_final]
                fail(f"workflows did not finish within 60s: {pending[:5]}")
            await asyncio.sleep(0.1)
    finally:
        await store.close()


async def _acknowledge(store: PgStore, producer: Producer, requests: list[CreateRequest]) -> None:
    """Send the reminder.ack event to every other reminder once its instance exists.

    The event usually arrives while the reminder still sleeps: it is stored and handed to
    the wait when the workflow gets there.
    """
    for index, request in enumerate(requests):
        if index % 2:
            continue
        assert request.instance_id is not None
        deadline = time.monotonic() + 30
        while not await store.find_instances(request.instance_id, request.tenant):
            if time.monotonic() > deadline:
                fail(f"instance {request.instance_id} was not created within 30s")
            await asyncio.sleep(0.05)
        await producer.send_event(
            EventRequest(
                request.tenant, request.instance_id, "reminder.ack", {"by": "demo"}, "ack-1"
            )
        )


__all__ = ["run_demo"]
