"""Real-service fixtures: a database and a RabbitMQ prefix of this test run's own.

Each run creates `stepfleet_test_<hex>` and the prefix `test-<hex>`, and removes both at the
end, so concurrent runs never see each other's rows or messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiormq
import pytest
import structlog
from aiormq.abc import DeliveredMessage
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.broker import Broker, Topology
from stepfleet.broker.admin import BrokerAdmin, ProducerCredentials
from stepfleet.client import CreateRequest, Producer
from stepfleet.control import Control
from stepfleet.schemas import InstanceKey, InstanceStatus, TenantLimits, digest_of
from stepfleet.store import PgStore
from stepfleet.store.migrate import ensure_database, upgrade
from stepfleet.workers.settings import Settings
from stepfleet.workers.worker import Worker

BASE_DB = os.environ.get(
    "STEPFLEET_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
AMQP = os.environ.get("STEPFLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session", autouse=True)
def logs_to_stderr() -> None:
    """In-process workers log to the process's stderr, whatever a test swaps sys.stdout for:
    a CLI command run in a test thread captures stdout, and a worker's line printed meanwhile
    would land in the command's output."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__))


@pytest.fixture(scope="session")
def run_id() -> str:
    """A short id unique to this test run."""
    return uuid.uuid4().hex[:10]


@contextmanager
def migrated_database(name: str) -> Iterator[str]:
    """Create and migrate the database `name` on the test server; drop it afterwards."""
    url = make_url(BASE_DB).set(database=name).render_as_string(hide_password=False)
    try:
        ensure_database(url)
    except Exception as exc:
        pytest.fail(f"PostgreSQL is not reachable at {BASE_DB}: {exc} (start it: see README)")
    upgrade(url)
    try:
        yield url
    finally:
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(run_id: str) -> Iterator[str]:
    """A migrated database that only this run uses, dropped afterwards."""
    with migrated_database(f"stepfleet_test_{run_id}") as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, run_id: str) -> Settings:
    """Settings pointing at this run's database and RabbitMQ prefix."""
    return Settings(
        database_url=database_url,
        amqp_url=AMQP,
        prefix=f"test-{run_id}",
        log_level="warning",
        concurrency=2,
        batch_size=32,
        fuel_per_run=200_000_000,
        memory_bytes=16 * 1024 * 1024,
        outbox_relay_after_seconds=2.0,
        health_file=None,
    )


@pytest.fixture(scope="session")
def topology(settings: Settings) -> Topology:
    """This run's broker names."""
    return settings.topology()


@pytest.fixture(scope="session")
async def broker(settings: Settings, topology: Topology) -> AsyncIterator[Broker]:
    """A connected broker with this run's topology declared, deleted at the end."""
    b = Broker(settings.amqp_url, topology)
    try:
        await b.connect(name="stepfleet-tests")
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at {AMQP}: {exc} (start it: see README)")
    await b.declare()
    yield b
    await b.delete_topology()
    await b.close()


@pytest.fixture(scope="session")
async def store(database_url: str) -> AsyncIterator[PgStore]:
    """The store over this run's database."""
    s = PgStore(database_url)
    yield s
    await s.close()


@pytest.fixture
async def start_worker(
    settings: Settings, broker: Broker
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Start in-process workers on this run's topology; all are stopped after the test."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(name: str = "w", **overrides: object) -> Worker:
        worker = Worker(settings.model_copy(update=overrides), name=name)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 10)
        running.append((worker, task))
        return worker

    yield start
    for worker, _ in running:
        worker.stop()
    for _, task in running:
        await asyncio.wait_for(task, 30)


async def wait_for_status(
    store: PgStore,
    key: InstanceKey,
    statuses: set[InstanceStatus],
    timeout: float = 20.0,
) -> tuple[object, str]:
    """Poll until the instance reaches one of `statuses`; fail the test after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        found = await store.find_instances(key.instance_id, key.tenant)
        if found:
            last = found[0][0]
            if last.status in statuses:
                return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} did not reach {statuses} in {timeout}s; last seen: {last}")


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 20.0
) -> None:
    """Poll `check` (plain or async) until it holds; fail the test after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        held = check()
        if not isinstance(held, bool):
            held = await held
        if held:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout}s")
        await asyncio.sleep(0.02)


def logged(logs: list[dict[str, Any]], event: str, **fields: object) -> list[dict[str, Any]]:
    """The captured log entries of `event` whose fields include `fields`."""
    return [
        entry
        for entry in logs
        if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items())
    ]


async def wait_for_log(
    logs: list[dict[str, Any]],
    event: str,
    count: int = 1,
    timeout: float = 20.0,
    **fields: object,
) -> list[dict[str, Any]]:
    """Wait until `logs` (from tests.conftest.capture_logs) holds `count` matching entries."""
    await wait_until(
        lambda: len(logged(logs, event, **fields)) >= count,
        f"{count} x {event} {fields}",
        timeout,
    )
    return logged(logs, event, **fields)


@pytest.fixture
async def playbook(
    settings: Settings, topology: Topology, store: PgStore, playbook_wasm: bytes
) -> Callable[..., Awaitable[InstanceKey]]:
    """Start a playbook instance from its ops (tenant acme unless named); returns its key."""
    digest = digest_of(playbook_wasm)
    pushed: set[str] = set()

    async def start(*ops: dict[str, Any], label: str = "pb", tenant: str = "acme") -> InstanceKey:
        if tenant not in pushed:
            await store.put_module(tenant, digest, playbook_wasm)
            pushed.add(tenant)
        instance_id = f"{label}-{uuid.uuid4().hex[:12]}"
        async with Producer(settings.amqp_url, topology) as producer:
            await producer.create(CreateRequest(tenant, digest, {"ops": list(ops)}, instance_id))
        return InstanceKey(tenant, instance_id)

    return start


@pytest.fixture
def control(store: PgStore, broker: Broker, topology: Topology) -> Control:
    """Operator actions over this run's store and broker."""
    return Control(store, broker, topology)


@dataclass
class RawClient:
    """A producer written from docs/protocol.md: one confirming channel, plus a dead-letter tap."""

    prefix: str
    channel: aiormq.abc.AbstractChannel
    letters: asyncio.Queue[DeliveredMessage]
    seen: dict[str | None, DeliveredMessage] = field(default_factory=dict)

    async def publish(
        self,
        tenant: str,
        instance_id: str,
        kind: str,
        body: dict[str, Any],
        module: str | None = None,
    ) -> str:
        """Publish one message as the doc describes it; return its message id."""
        headers = {
            "x-tenant": tenant,
            "x-instance-id": instance_id,
            "x-kind": kind,
            "x-schema-version": "1",
        }
        if module is not None:
            headers["x-module"] = module
        message_id = f"{tenant}/{instance_id}/{kind}"
        confirmation = await self.channel.basic_publish(
            json.dumps(body).encode("utf-8"),
            exchange=f"{self.prefix}.ingress",
            routing_key=f"{tenant}.{kind}",
            mandatory=True,
            properties=aiormq.spec.Basic.Properties(
                delivery_mode=2,
                content_type="application/json",
                message_id=message_id,
                headers=headers,
                # The broker user this connection logged in as (RabbitMQ checks it).
                user_id="guest",
            ),
        )
        assert isinstance(confirmation, aiormq.spec.Basic.Ack), confirmation
        return message_id

    async def dead_letter(self, message_id: str, timeout: float = 15.0) -> DeliveredMessage:
        """Wait for the dead letter of one message; letters of others are kept for later
        (lanes do not keep order between tenants)."""
        async with asyncio.timeout(timeout):
            while message_id not in self.seen:
                letter = await self.letters.get()
                self.seen[letter.header.properties.message_id] = letter
        return self.seen.pop(message_id)

    def dead_letter_ids(self) -> set[str | None]:
        """The message ids of the dead letters received so far."""
        while not self.letters.empty():
            letter = self.letters.get_nowait()
            self.seen[letter.header.properties.message_id] = letter
        return set(self.seen)


@pytest.fixture
async def raw(settings, broker) -> AsyncIterator[RawClient]:
    """A bare aiormq connection with a queue of its own bound to `<prefix>.dead-letter`."""
    connection = await aiormq.connect(settings.amqp_url)
    channel = await connection.channel()  # publisher confirms are on by default
    letters: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
    declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
    assert declared.queue is not None
    await channel.queue_bind(declared.queue, f"{settings.prefix}.dead-letter", routing_key="")
    await channel.basic_consume(declared.queue, letters.put, no_ack=True)
    yield RawClient(settings.prefix, channel, letters)
    await connection.close()


@pytest.fixture
async def tenant(
    settings, topology, store
) -> AsyncIterator[Callable[..., Awaitable[tuple[str, ProducerCredentials]]]]:
    """Create tenants with producer users; the users are deleted afterwards."""
    admin = BrokerAdmin(settings.rabbitmq_admin_url, topology)
    users: list[str] = []

    async def add(limits: TenantLimits | None = None) -> tuple[str, ProducerCredentials]:
        name = f"t{uuid.uuid4().hex[:10]}"
        credentials = await admin.add_producer(name)
        users.append(credentials.user)
        await store.tenants.add(name, credentials.user, limits or TenantLimits())
        return name, credentials

    yield add
    for user in users:
        await admin.delete_producer(user)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[ProducerCredentials], Awaitable[Any]]]:
    """Open AMQP channels as a producer user; everything is closed afterwards."""
    connections: list[Any] = []

    async def open_channel(credentials: ProducerCredentials) -> Any:
        connection = await aiormq.connect(
            f"amqp://{credentials.user}:{credentials.password}@127.0.0.1:5672/"
        )
        connections.append(connection)
        return await connection.channel()

    yield open_channel
    for connection in connections:
        if not connection.is_closed:
            await connection.close()
