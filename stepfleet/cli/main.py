"""`stepfleet`: migrate, declare, push modules, create instances, inspect them, run workers."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Annotated

import typer

from stepfleet.broker import Broker, Topology
from stepfleet.cli.common import fail, run, settings
from stepfleet.client import CreateRequest, Producer
from stepfleet.sandbox import InvalidModule, WasmSandbox
from stepfleet.schemas import JournalEntry, digest_of, is_digest, is_tenant
from stepfleet.store import InstanceRecord, PgStore, StoreUnavailable
from stepfleet.store.migrate import ensure_database, upgrade
from stepfleet.workers.logs import configure_logging
from stepfleet.workers.worker import Worker

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
module_app = typer.Typer(
    no_args_is_help=True, help="Tenant modules in the content-addressed store."
)
app.add_typer(module_app, name="module")


@app.command()
def migrate() -> None:
    """Create the database if needed and apply every migration."""
    url = settings().database_url
    try:
        created = ensure_database(url)
        upgrade(url)
    except StoreUnavailable as exc:
        fail(f"PostgreSQL: {exc}")
    typer.echo(("created the database; " if created else "") + "schema is at head")


@app.command()
def declare() -> None:
    """Declare the RabbitMQ exchanges, queues and bindings (idempotent)."""
    config = settings()

    async def go() -> None:
        async with Broker(config.amqp_url, Topology(config.prefix, config.delivery_limit)) as b:
            await b.declare()

    run(go())
    typer.echo(f"topology {config.prefix}.* declared")


@module_app.command("push")
def module_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    tenant: Annotated[str, typer.Option(help="Tenant that may run this module.")],
) -> None:
    """Validate a module and store it; print its digest (pushing the same bytes is a no-op)."""
    if not is_tenant(tenant):
        fail(f"{tenant!r} is not a tenant name (lower-case letters, digits, - and _)")
    config = settings()
    wasm = file.read_bytes()
    try:
        WasmSandbox(config.sandbox_limits()).validate(wasm)
    except InvalidModule as exc:
        fail(f"{file} refused: {exc}")
    digest = digest_of(wasm)

    async def go() -> bool:
        store = PgStore(config.database_url, pool_size=1)
        try:
            return await store.put_module(tenant, digest, wasm)
        finally:
            await store.close()

    new = run(go())
    typer.echo(digest)
    if not new:
        typer.echo(f"(already pushed for {tenant})", err=True)


@module_app.command("list")
def module_list(tenant: Annotated[str, typer.Option(help="Tenant whose modules to list.")]) -> None:
    """List a tenant's modules, newest first."""
    config = settings()

    async def go() -> list[tuple[str, int, object]]:
        store = PgStore(config.database_url, pool_size=1)
        try:
            return list(await store.tenant_modules(tenant))
        finally:
            await store.close()

    for digest, size, pushed_at in run(go()):
        typer.echo(f"{digest}  {size:>9} bytes  {pushed_at}")


@app.command()
def create(
    tenant: Annotated[str, typer.Option(help="Tenant the instance belongs to.")],
    module: Annotated[str, typer.Option(help="Digest of a module pushed for the tenant.")],
    params: Annotated[str, typer.Option(help="Params as JSON.")] = "{}",
    instance_id: Annotated[
        str | None, typer.Option("--id", help="Instance id (default: a UUID).")
    ] = None,
) -> None:
    """Publish a create message; print the instance id."""
    try:
        parsed = json.loads(params)
    except ValueError as exc:
        fail(f"--params is not JSON: {exc}")
    if not is_digest(module):
        fail(f"--module {module!r} is not a digest (sha256:<64 hex digits>)")
    config = settings()

    async def go() -> str:
        async with Producer(config.amqp_url, Topology(config.prefix, config.delivery_limit)) as p:
            return await p.create(CreateRequest(tenant, module, parsed, instance_id))

    try:
        typer.echo(run(go()))
    except ValueError as exc:
        fail(str(exc))


def _status_json(
    record: InstanceRecord, params: str, journal: list[JournalEntry]
) -> dict[str, object]:
    return {
        "tenant": record.key.tenant,
        "id": record.key.instance_id,
        "module": record.module,
        "status": record.status.value,
        "params": json.loads(params),
        "output": None if record.output is None else json.loads(record.output),
        "error": record.error,
        "created_at": record.created_at.isoformat() if record.created_at else None,
        "updated_at": record.updated_at.isoformat() if record.updated_at else None,
        "journal": [
            {
                "seq": e.seq,
                "name": e.name,
                "kind": e.kind.name.lower(),
                "attempt": e.attempt,
                "started_at": e.started_at.isoformat() if e.started_at else None,
                "ms": _ms(e),
            }
            for e in journal
        ],
    }


def _ms(entry: JournalEntry) -> float | None:
    if entry.started_at is None or entry.finished_at is None:
        return None
    return round((entry.finished_at - entry.started_at).total_seconds() * 1000, 3)


@app.command()
def status(
    instance_id: Annotated[str, typer.Argument(help="Instance id.")],
    tenant: Annotated[str | None, typer.Option(help="Tenant (needed when ids repeat).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show an instance: status, output or error, and its journal."""
    config = settings()

    async def go() -> list[tuple[InstanceRecord, str, list[JournalEntry]]]:
        store = PgStore(config.database_url, pool_size=1)
        try:
            found = await store.find_instances(instance_id, tenant)
            return [(record, params, await store.journal(record.key)) for record, params in found]
        finally:
            await store.close()

    found = run(go())
    if not found:
        fail(f"no instance {instance_id!r}" + (f" for tenant {tenant}" if tenant else ""))
    if len(found) > 1:
        tenants = ", ".join(record.key.tenant for record, _, _ in found)
        fail(f"instance id {instance_id!r} exists for several tenants ({tenants}): pass --tenant")
    record, params, journal = found[0]
    if as_json:
        typer.echo(json.dumps(_status_json(record, params, journal), indent=2))
        return
    typer.echo(f"instance  {record.key.tenant}/{record.key.instance_id}")
    typer.echo(f"status    {record.status.value}")
    typer.echo(f"module    {record.module}")
    if record.output is not None:
        typer.echo(f"output    {record.output}")
    if record.error is not None:
        typer.echo(f"error     {record.error}")
    typer.echo(f"journal   {len(journal)} entries")
    for entry in journal:
        typer.echo(
            f"  {entry.seq:>4}  {entry.name:<24} {entry.kind.name.lower():<15} "
            f"attempt {entry.attempt}  {_ms(entry)} ms"
        )


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Batches in flight at once.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Deliveries per transaction.")] = None,
) -> None:
    """Run a worker until SIGTERM or SIGINT, then finish in-flight steps and exit 0."""
    overrides = {
        k: v for k, v in {"concurrency": concurrency, "batch_size": batch_size}.items() if v
    }
    config = settings().model_copy(update=overrides)
    configure_logging(config.log_level, config.log_format)

    async def go() -> None:
        node = Worker(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop)
        await node.run()

    run(go())


@app.command()
def demo(
    workers: Annotated[int, typer.Option(help="Worker processes to start.")] = 2,
    per_tenant: Annotated[int, typer.Option(help="Workflows to run per example.")] = 5,
    examples: Annotated[
        Path | None, typer.Option(help="Folder holding order/order.wasm and greeter/greeter.wasm.")
    ] = None,
) -> None:
    """The main job: migrate, declare, push the examples, run a fleet, print the results."""
    from stepfleet.cli.demo import EXAMPLES, run_demo

    run_demo(settings(), workers=workers, per_tenant=per_tenant, examples=examples or EXAMPLES)


def main() -> None:
    """Entry point of the `stepfleet` script."""
    app(prog_name="stepfleet")
