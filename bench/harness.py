"""A throwaway deployment for benchmarks: its own database and broker prefix, removed after.

async with bench_deployment(module) as deployment:
    await deployment.push("acme")          # or populate(names): thousands of tenants at once
    workers = start_workers(2, deployment.env)
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from stepfleet.broker import Broker, Topology
from stepfleet.schemas import TenantLimits, digest_of
from stepfleet.store import PgStore
from stepfleet.store.migrate import ensure_database, upgrade

BASE_DB = os.environ.get(
    "STEPFLEET_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
AMQP = os.environ.get("STEPFLEET_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class Deployment:
    """What a benchmark needs to drive its fleet."""

    url: str
    topology: Topology
    broker: Broker
    wasm: bytes
    digest: str

    @property
    def env(self) -> dict[str, str]:
        """The environment of a worker process of this deployment."""
        return {
            **os.environ,
            "STEPFLEET_DATABASE_URL": self.url,
            "STEPFLEET_AMQP_URL": AMQP,
            "STEPFLEET_PREFIX": self.topology.prefix,
            "STEPFLEET_LOG_LEVEL": os.environ.get("STEPFLEET_LOG_LEVEL", "warning"),
        }

    async def push(self, *tenants: str) -> None:
        """Push the module for these tenants."""
        store = PgStore(self.url, pool_size=1)
        try:
            for tenant in tenants:
                await store.put_module(tenant, self.digest, self.wasm)
        finally:
            await store.close()

    async def limit(self, tenant: str, limits: TenantLimits) -> None:
        """Give a tenant its own limits (workers read them when they start)."""
        store = PgStore(self.url, pool_size=1)
        try:
            if not await store.tenants.add(tenant, None, limits):
                await store.tenants.set_limits(tenant, limits)
        finally:
            await store.close()

    async def populate(self, tenants: Sequence[str]) -> None:
        """Make these tenants known to the fleet, each with the module pushed: tenant rows and
        module rows inserted in two statements, so that 10,000 tenants take a second."""
        await self.push(tenants[0])  # stores the module itself
        engine = create_engine(self.url)
        try:
            with engine.begin() as connection:
                names = {"names": list(tenants), "digest": self.digest}
                connection.execute(
                    text(
                        "INSERT INTO tenants (name) SELECT unnest(CAST(:names AS text[])) "
                        "ON CONFLICT DO NOTHING"
                    ),
                    names,
                )
                connection.execute(
                    text(
                        "INSERT INTO tenant_modules (tenant, digest) "
                        "SELECT unnest(CAST(:names AS text[])), :digest ON CONFLICT DO NOTHING"
                    ),
                    names,
                )
        finally:
            engine.dispose()


@asynccontextmanager
async def bench_deployment(module: Path) -> AsyncIterator[Deployment]:
    """Create a migrated database and a declared topology of their own; drop both after."""
    run_id = uuid.uuid4().hex[:8]
    url: URL = make_url(BASE_DB).set(database=f"stepfleet_bench_{run_id}")
    url_text = url.render_as_string(hide_password=False)
    ensure_database(url_text)
    upgrade(url_text)
    topology = Topology(f"bench-{run_id}")
    broker = Broker(AMQP, topology)
    await broker.connect()
    await broker.declare()
    wasm = await asyncio.to_thread(module.read_bytes)
    try:
        yield Deployment(url_text, topology, broker, wasm, digest_of(wasm))
    finally:
        await broker.delete_topology()
        await broker.close()
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        admin.dispose()
