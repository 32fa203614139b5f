"""Creating a tenant with its RabbitMQ producer user; audited (never with the password)."""

from __future__ import annotations

from dataclasses import dataclass

from stepfleet.broker import Topology
from stepfleet.broker.admin import BrokerAdmin, ProducerCredentials, producer_user
from stepfleet.control.actions import ControlError
from stepfleet.control.audit import operator_name
from stepfleet.schemas import TenantLimits, is_tenant
from stepfleet.store import AuditEntry, PgStore


@dataclass(frozen=True, slots=True)
class NewTenant:
    """The outcome of `add_tenant`: `credentials` hold the producer password, to be shown
    once and kept nowhere."""

    name: str
    created: bool
    """False: the tenant existed with this producer user (its password was reset)."""
    credentials: ProducerCredentials | None


async def add_tenant(
    store: PgStore,
    admin: BrokerAdmin | None,
    topology: Topology,
    name: str,
    limits: TenantLimits,
    *,
    actor: str | None = None,
) -> NewTenant:
    """Create a tenant, and with `admin` its producer user (or reset that user's password
    when the tenant exists with it).

    Raises:
        ControlError: not a tenant name, or the tenant exists with another producer user.
        BrokerError: the RabbitMQ management API refused or could not be reached.
    """
    if not is_tenant(name):
        raise ControlError(f"{name!r} is not a tenant name (lower-case letters, digits, - and _)")
    existing = await store.tenants.get(name)
    wanted = producer_user(topology, name) if admin is not None else None
    if existing is not None and existing.broker_user != wanted:
        raise ControlError(
            f"tenant {name} exists with producer user {existing.broker_user!r}; nothing was changed"
        )
    credentials = await admin.add_producer(name) if admin is not None else None
    created = await store.tenants.add(name, wanted, limits)
    if created or credentials is not None:  # else nothing changed
        detail = f"producer user {wanted or '-'}"
        if created:
            detail += f", limits {limits.model_dump_json(exclude_none=True)}"
        async with store.control() as tx:
            await tx.audit(
                AuditEntry(
                    actor or operator_name(),
                    "tenant-add" if created else "tenant-reset-producer",
                    name,
                    detail=detail,
                )
            )
    return NewTenant(name, created, credentials)
