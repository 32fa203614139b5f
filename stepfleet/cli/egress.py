"""Egress commands: tenants' allow lists (`stepfleet tenant ...`) and secrets (`stepfleet secret`).

Secret values are read from standard input or a hidden prompt, never from the command line,
and nothing of a value is ever printed. They are sealed with STEPFLEET_SECRET_KEY (Fernet) before
they reach PostgreSQL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from stepfleet.cli.common import fail, run, say, settings, shown
from stepfleet.cli.tenants import tenant_app
from stepfleet.schemas import is_tenant

if TYPE_CHECKING:  # each command imports what it uses when it runs
    from stepfleet.store import StoredSecret, TenantStore

T = TypeVar("T")

secret_app = typer.Typer(
    no_args_is_help=True,
    help="Tenant secrets the egress gateway adds to guests' HTTP calls (guests never see them).",
)

TenantArg = Annotated[str, typer.Argument(help="Tenant name.")]
HostArg = Annotated[
    str,
    typer.Argument(
        help="Host name or address as guests' URLs will write it, with an optional port "
        "(api.example.com allows ports 80 and 443; 127.0.0.1:8080 that port only)."
    ),
]
NameArg = Annotated[str, typer.Argument(help="Secret name, unique per tenant.")]


def _tenant(name: str) -> str:
    if not is_tenant(name):
        fail(f"{name!r} is not a tenant name (lower-case letters, digits, - and _)")
    return name


def _host(entry: str) -> str:
    from stepfleet.egress import HostError, normalize_host_entry

    try:
        return normalize_host_entry(entry)
    except HostError as exc:
        fail(str(exc))


async def _with_tenants(action: Callable[[TenantStore], Awaitable[T]]) -> T:
    from stepfleet.store import PgStore

    store = PgStore(settings().database_url, pool_size=1)
    try:
        return await action(store.tenants)
    finally:
        await store.close()


def _require_tenant(tenant: str) -> None:
    async def known(tenants: TenantStore) -> bool:
        return await tenants.get(tenant) is not None

    if not run(_with_tenants(known)):
        fail(f"no tenant {tenant!r}: add it first (`stepfleet tenant add`)")


def _secret_key() -> str:
    """STEPFLEET_SECRET_KEY, from the settings when they have it, else the environment."""
    from pydantic import SecretStr

    from stepfleet.control import SecretError, sealing_key

    value: object = getattr(settings(), "secret_key", None)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    key = value if isinstance(value, str) and value else os.environ.get("STEPFLEET_SECRET_KEY", "")
    try:
        return sealing_key(key)
    except SecretError as exc:
        fail(str(exc))


def _read_value() -> str:
    """The secret value from a hidden prompt (a terminal) or standard input (anything else)."""
    from stepfleet.egress import check_secret_value

    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        value = str(typer.prompt("Secret value", hide_input=True, confirmation_prompt=True))
    else:
        value = stdin.read() if stdin is not None else ""
        # One trailing line break is the end of the line, not part of the secret.
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    try:
        check_secret_value(value)
    except ValueError as exc:
        fail(str(exc))
    return value


@tenant_app.command("allow-host")
def allow_host(tenant: TenantArg, host: HostArg) -> None:
    """Let the tenant's guests call HOST through the egress gateway."""
    tenant, entry = _tenant(tenant), _host(host)
    _require_tenant(tenant)

    async def go(tenants: TenantStore) -> None:
        await tenants.allow_host(tenant, entry)

    run(_with_tenants(go))
    say(f"{tenant} may call {shown(entry)}")


@tenant_app.command("deny-host")
def deny_host(tenant: TenantArg, host: HostArg) -> None:
    """Take HOST off the tenant's allow list (its secrets for HOST stay, unused)."""
    tenant, entry = _tenant(tenant), _host(host)

    async def go(tenants: TenantStore) -> bool:
        before = (await tenants.allowed_hosts()).get(tenant, set())
        await tenants.deny_host(tenant, entry)
        return entry in before

    removed = run(_with_tenants(go))
    say(f"{tenant} may not call {shown(entry)}" + ("" if removed else " (it was not allowed)"))


@tenant_app.command("hosts")
def hosts(
    tenant: Annotated[str | None, typer.Argument(help="Only this tenant.")] = None,
) -> None:
    """List the egress allow lists."""

    async def go(tenants: TenantStore) -> dict[str, set[str]]:
        return await tenants.allowed_hosts()

    for name, entries in sorted(run(_with_tenants(go)).items()):
        if tenant is None or name == tenant:
            for entry in sorted(entries):
                say(f"{shown(name)}  {shown(entry)}")


@secret_app.command("set")
def secret_set(
    tenant: TenantArg,
    name: NameArg,
    host: Annotated[str, typer.Option(help="The host the secret is sent to (as in allow-host).")],
    header: Annotated[str, typer.Option(help="The header it is sent in, e.g. Authorization.")],
) -> None:
    """Store (or replace) a secret, read from standard input or a hidden prompt, never argv.

    The egress gateway adds `HEADER: value` to the tenant's calls to HOST and scrubs the value
    from every answer; nothing of the value is printed.
    """
    from stepfleet.control import ControlError, SecretSet, check_secret, set_secret
    from stepfleet.store import PgStore

    tenant = _tenant(tenant)
    try:
        entry = check_secret(name, host, header)
    except ControlError as exc:
        fail(str(exc))
    key = _secret_key()
    _require_tenant(tenant)
    value = _read_value()

    async def go() -> SecretSet:
        store = PgStore(settings().database_url, pool_size=1)
        try:
            return await set_secret(store, key, tenant, name, entry, header, value)
        finally:
            await store.close()

    try:
        stored = run(go())
    except ControlError as exc:
        fail(str(exc))
    say(f"secret {name} of {tenant} stored: sent to {shown(entry)} in the {shown(header)} header")
    if not stored.allowed:
        say(
            f"note: {entry} is not on {tenant}'s allow list yet "
            f"(`stepfleet tenant allow-host {tenant} {entry}`)",
            err=True,
        )


@secret_app.command("delete")
def secret_delete(tenant: TenantArg, name: NameArg) -> None:
    """Delete a secret."""
    from stepfleet.control import delete_secret
    from stepfleet.store import PgStore

    tenant = _tenant(tenant)

    async def go() -> bool:
        store = PgStore(settings().database_url, pool_size=1)
        try:
            return await delete_secret(store, tenant, name)
        finally:
            await store.close()

    if not run(go()):
        fail(f"no secret {name!r} for tenant {tenant}")
    say(f"secret {name} of {tenant} deleted")


@secret_app.command("list")
def secret_list(
    tenant: Annotated[str | None, typer.Argument(help="Only this tenant.")] = None,
) -> None:
    """List secrets: tenant, name, host and header (never a value)."""

    from stepfleet.control import tenant_secrets

    async def go(tenants: TenantStore) -> list[StoredSecret]:
        return await tenant_secrets(tenants, tenant)

    for secret in run(_with_tenants(go)):
        say(
            f"{shown(secret.tenant)}  {shown(secret.name)}  {shown(secret.host)}  "
            f"{shown(secret.header)}"
        )


@secret_app.command("key")
def secret_key() -> None:
    """Print a new random key for STEPFLEET_SECRET_KEY (a Fernet key)."""
    from stepfleet.egress import new_key

    say(new_key())


def register_egress_commands(app: typer.Typer) -> None:
    """Add `stepfleet secret`; importing this module adds allow-host, deny-host and hosts to
    `stepfleet tenant`."""
    app.add_typer(secret_app, name="secret")
