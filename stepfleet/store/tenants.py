"""Tenants: their broker identity, limits, egress allow list and encrypted secrets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from stepfleet.schemas import TenantLimits
from stepfleet.store.errors import translated
from stepfleet.store.tables import tenant_egress, tenant_secrets, tenants


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """A tenant as the fleet knows it."""

    name: str
    broker_user: str | None
    limits: TenantLimits
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """A secret as stored: its ciphertext, and where the gateway may send it."""

    tenant: str
    name: str
    host: str
    header: str
    ciphertext: bytes


class TenantStore:
    """Tenant rows; shares the PgStore's connection pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, name: str, broker_user: str | None, limits: TenantLimits) -> bool:
        """Create a tenant; return False when it exists already (nothing is changed)."""
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(
                insert(tenants)
                .values(name=name, broker_user=broker_user, limits=limits.model_dump_json())
                .on_conflict_do_nothing(constraint="pk_tenants")
                .returning(tenants.c.name)
            )
            return result.first() is not None

    async def all(self) -> list[TenantRecord]:
        """Every tenant, by name."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(select(tenants).order_by(tenants.c.name))
            return [_tenant(row) for row in result]

    async def get(self, name: str) -> TenantRecord | None:
        async with translated(), self._engine.connect() as connection:
            row = (await connection.execute(select(tenants).where(tenants.c.name == name))).first()
            return None if row is None else _tenant(row)

    async def set_limits(self, name: str, limits: TenantLimits) -> bool:
        """Replace a tenant's limits; return False for an unknown tenant."""
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(
                update(tenants)
                .where(tenants.c.name == name)
                .values(limits=limits.model_dump_json(exclude_none=True))
            )
            return bool(result.rowcount)

    async def allow_host(self, tenant: str, host: str) -> None:
        """Let the tenant's guests call `host` through the egress gateway."""
        async with translated(), self._engine.begin() as connection:
            await connection.execute(
                insert(tenant_egress)
                .values(tenant=tenant, host=host)
                .on_conflict_do_nothing(constraint="pk_tenant_egress")
            )

    async def deny_host(self, tenant: str, host: str) -> None:
        async with translated(), self._engine.begin() as connection:
            await connection.execute(
                delete(tenant_egress).where(
                    tenant_egress.c.tenant == tenant, tenant_egress.c.host == host
                )
            )

    async def allowed_hosts(self) -> dict[str, set[str]]:
        """Every tenant's egress allow list."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(select(tenant_egress.c.tenant, tenant_egress.c.host))
            hosts: dict[str, set[str]] = {}
            for row in result:
                hosts.setdefault(row.tenant, set()).add(row.host)
            return hosts

    async def put_secret(self, secret: StoredSecret) -> None:
        """Store (or replace) an encrypted secret."""
        async with translated(), self._engine.begin() as connection:
            statement = insert(tenant_secrets).values(
                tenant=secret.tenant,
                name=secret.name,
                host=secret.host,
                header=secret.header,
                ciphertext=secret.ciphertext,
            )
            await connection.execute(
                statement.on_conflict_do_update(
                    constraint="pk_tenant_secrets",
                    set_={
                        "host": statement.excluded.host,
                        "header": statement.excluded.header,
                        "ciphertext": statement.excluded.ciphertext,
                    },
                )
            )

    async def delete_secret(self, tenant: str, name: str) -> bool:
        async with translated(), self._engine.begin() as connection:
            result = await connection.execute(
                delete(tenant_secrets).where(
                    tenant_secrets.c.tenant == tenant, tenant_secrets.c.name == name
                )
            )
            return bool(result.rowcount)

    async def secrets(self) -> list[StoredSecret]:
        """Every stored secret, still encrypted."""
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(select(tenant_secrets))
            return [
                StoredSecret(r.tenant, r.name, r.host, r.header, bytes(r.ciphertext))
                for r in result
            ]


def _tenant(row: Any) -> TenantRecord:
    return TenantRecord(
        name=row.name,
        broker_user=row.broker_user,
        limits=TenantLimits.model_validate_json(row.limits),
        created_at=row.created_at,
    )
