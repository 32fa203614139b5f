"""`stepfleet tenant ...`: tenants, their producer users and their limits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from stepfleet.cli.common import fail, json_text, run, say, settings, shown
from stepfleet.schemas import is_tenant

if TYPE_CHECKING:  # each command imports what it uses when it runs
    from stepfleet.control import NewTenant
    from stepfleet.schemas import TenantLimits
    from stepfleet.store import TenantRecord

tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: producer users and limits.")


def _limits(text: str) -> TenantLimits:
    from pydantic import ValidationError

    from stepfleet.schemas import TenantLimits

    try:
        return TenantLimits.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "limits"
        fail(f"--limits: {where}: {first['msg']}")


@tenant_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Tenant name (lower-case letters, digits, - _).")],
    producer: Annotated[
        bool, typer.Option(help="Create the tenant's RabbitMQ producer user.")
    ] = True,
    limits: Annotated[str, typer.Option(help='Limits as JSON, e.g. {"running_steps":4}.')] = "{}",
) -> None:
    """Create a tenant and its producer user; print how its producers connect."""
    if not is_tenant(name):
        fail(f"{name!r} is not a tenant name (lower-case letters, digits, - and _)")
    parsed = _limits(limits)
    config = settings()
    topology = config.topology()

    async def go() -> NewTenant:
        from stepfleet.broker.admin import BrokerAdmin
        from stepfleet.control import add_tenant
        from stepfleet.store import PgStore

        store = PgStore(config.database_url, pool_size=1)
        admin = (
            BrokerAdmin(config.rabbitmq_admin_url, topology, vhost=config.vhost)
            if producer
            else None
        )
        try:
            return await add_tenant(store, admin, topology, name, parsed)
        finally:
            await store.close()

    from stepfleet.control import ControlError

    try:
        added = run(go())
    except ControlError as exc:
        fail(str(exc))
    if added.created:
        say(f"tenant {name} created")
    else:
        reset = " (producer password reset)" if added.credentials else " (nothing changed)"
        say(f"tenant {name} exists{reset}")
    credentials = added.credentials
    if credentials is None:
        return
    say(
        "\nProducers connect and publish like this (the password is shown once):\n"
        f"  user       {credentials.user}\n"
        f"  password   {credentials.password}\n"
        f"  vhost      {credentials.vhost}\n"
        f"  exchange   {topology.ingress_exchange}\n"
        f"  routing    {name}.create, {name}.event\n"
        f"  property   user_id = {credentials.user}  (required; RabbitMQ checks it)\n"
        f"  headers    x-tenant = {name}, see docs/protocol.md"
    )


@tenant_app.command("list")
def list_tenants() -> None:
    """List tenants with their producer user and limits."""
    config = settings()

    async def go() -> list[TenantRecord]:
        from stepfleet.store import PgStore

        store = PgStore(config.database_url, pool_size=1)
        try:
            return await store.tenants.all()
        finally:
            await store.close()

    for tenant in run(go()):
        own = tenant.limits.model_dump(exclude_none=True)
        say(f"{shown(tenant.name):<24} {shown(tenant.broker_user or '-'):<40} {json_text(own)}")


@tenant_app.command("limits")
def set_limits(
    name: Annotated[str, typer.Argument(help="Tenant name.")],
    limits: Annotated[str, typer.Argument(help="Limits as JSON; {} restores the defaults.")],
) -> None:
    """Replace a tenant's limits (workers pick them up within 10 seconds)."""
    parsed = _limits(limits)
    config = settings()

    async def go() -> bool:
        from stepfleet.store import PgStore

        store = PgStore(config.database_url, pool_size=1)
        try:
            return await store.tenants.set_limits(name, parsed)
        finally:
            await store.close()

    if not run(go()):
        fail(f"no tenant {name!r}: stepfleet tenant add {name}")
    say(f"limits of {name}: {json_text(parsed.model_dump(exclude_none=True))}")
