"""Tenant secrets the egress gateway sends for guests: set (sealed before they reach
PostgreSQL), list and delete; audited. No value is ever logged, audited or answered."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stepfleet.control.actions import ControlError
from stepfleet.control.audit import operator_name
from stepfleet.egress import (
    HostError,
    SealError,
    check_key,
    check_secret_header,
    check_secret_value,
    normalize_host_entry,
    seal_secret,
)
from stepfleet.schemas import is_tenant
from stepfleet.store import AuditEntry, PgStore, StoredSecret, TenantStore

SECRET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # noqa: S105 (a pattern, not a secret)


class SecretError(ControlError):
    """A secret that cannot be stored as asked; the message never holds its value."""


@dataclass(frozen=True, slots=True)
class SecretSet:
    host: str
    """The host entry as stored (normalized)."""
    allowed: bool
    """Whether the host is on the tenant's allow list yet (the secret is unused until it is)."""


def sealing_key(configured: str | None) -> str:
    """STEPFLEET_SECRET_KEY, checked; SecretError when it is unset or not a Fernet key."""
    if not configured:
        raise SecretError(
            "STEPFLEET_SECRET_KEY is not set: make a key with `stepfleet secret key` and give "
            "the same one to the workers"
        )
    try:
        check_key(configured)
    except SealError as exc:
        raise SecretError(f"STEPFLEET_SECRET_KEY: {exc}") from None
    return configured


def check_secret(name: str, host: str, header: str) -> str:
    """Check where a secret goes; return the normalized host entry."""
    if not re.fullmatch(SECRET_NAME_PATTERN, name):
        raise SecretError(f"{name!r} is not a secret name (1 to 64 letters, digits, _ . -)")
    try:
        entry = normalize_host_entry(host)
        check_secret_header(header)
    except (HostError, ValueError) as exc:
        raise SecretError(str(exc)) from None
    return entry


async def set_secret(
    store: PgStore,
    key: str,
    tenant: str,
    name: str,
    host: str,
    header: str,
    value: str,
    *,
    actor: str | None = None,
) -> SecretSet:
    """Seal and store (or replace) a tenant's secret.

    Raises:
        SecretError: a bad name, host, header or value (the message says nothing of it).
        ControlError: no such tenant.
    """
    entry = check_secret(name, host, header)
    try:
        check_secret_value(value)
    except ValueError as exc:
        raise SecretError(str(exc)) from None
    if not is_tenant(tenant) or await store.tenants.get(tenant) is None:
        raise ControlError(f"no tenant {tenant!r}: add it first (`stepfleet tenant add`)")
    sealed = seal_secret(key, tenant, name, entry, header, value)
    await store.tenants.put_secret(StoredSecret(tenant, name, entry, header, sealed))
    async with store.control() as tx:
        await tx.audit(
            AuditEntry(
                actor or operator_name(),
                "secret-set",
                f"{tenant}/{name}",
                detail=f"sent to {entry} in the {header} header",
            )
        )
    allowed = entry in (await store.tenants.allowed_hosts()).get(tenant, set())
    return SecretSet(entry, allowed)


async def delete_secret(
    store: PgStore, tenant: str, name: str, *, actor: str | None = None
) -> bool:
    """Delete a tenant's secret; False when there was none (nothing is audited then)."""
    if not await store.tenants.delete_secret(tenant, name):
        return False
    async with store.control() as tx:
        await tx.audit(AuditEntry(actor or operator_name(), "secret-delete", f"{tenant}/{name}"))
    return True


async def tenant_secrets(tenants: TenantStore, tenant: str | None = None) -> list[StoredSecret]:
    """Stored secrets (still sealed), of one tenant or all, by tenant and name."""
    found = await tenants.secrets()
    return sorted(
        (s for s in found if tenant is None or s.tenant == tenant), key=lambda s: (s.tenant, s.name)
    )
