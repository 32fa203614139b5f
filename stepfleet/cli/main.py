"""`stepfleet`: migrate, declare, push modules, create instances, inspect them, run workers."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from stepfleet.cli.api import register_api_commands
from stepfleet.cli.common import fail, run, say, settings, shown
from stepfleet.cli.dlq import register_operations_commands
from stepfleet.cli.egress import register_egress_commands
from stepfleet.cli.instances import plain_status_call, register_instance_commands, status
from stepfleet.cli.modules import register_module_commands
from stepfleet.cli.orchestrators import register_orchestrator_commands
from stepfleet.cli.tenants import tenant_app
from stepfleet.schemas import is_digest, is_tenant

if TYPE_CHECKING:
    import asyncio

# Each command imports the libraries it needs (SQLAlchemy, aio-pika, wasmtime, ...) when it
# runs, so `--help` and the commands that need one service start quickly.

# Plain help (no rich markup): flags show no `<bool>`, and rich is not imported to print it.
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, rich_markup_mode=None)
module_app = typer.Typer(
    no_args_is_help=True, help="Tenant modules in the content-addressed store."
)
app.add_typer(module_app, name="module")
app.add_typer(tenant_app, name="tenant")
register_module_commands(module_app)
register_egress_commands(app)
register_operations_commands(app)
register_orchestrator_commands(app)
register_api_commands(app)


@app.command()
def migrate() -> None:
    """Create the database if needed and apply every migration."""
    from stepfleet.store import StoreUnavailable
    from stepfleet.store.migrate import ensure_database, upgrade

    url = settings().database_url
    try:
        created = ensure_database(url)
        upgrade(url)
    except StoreUnavailable as exc:
        fail(f"PostgreSQL: {exc}")
    say(("created the database; " if created else "") + "schema is at head")


@app.command()
def declare() -> None:
    """Declare the RabbitMQ exchanges, queues and bindings (idempotent)."""
    from stepfleet.broker import Broker

    config = settings()

    async def go() -> None:
        async with Broker(config.amqp_url, config.topology()) as b:
            await b.declare()

    run(go())
    say(f"topology {config.prefix}.* declared")


@module_app.command("push")
def module_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    tenant: Annotated[str, typer.Option(help="Tenant that may run this module.")],
) -> None:
    """Validate a module and store it; print its digest (pushing the same bytes is a no-op)."""
    from stepfleet.control import ControlError, ModuleCache, ModuleRefused, Pushed, push_module
    from stepfleet.store import PgStore

    if not is_tenant(tenant):
        fail(f"{tenant!r} is not a tenant name (lower-case letters, digits, - and _)")
    config = settings()
    wasm = file.read_bytes()

    async def go() -> Pushed:
        store = PgStore(config.database_url, pool_size=1)
        try:
            cache = ModuleCache(
                config.module_cache_dir, config.module_cache_bytes, config.module_cache_key
            )
            return await push_module(
                store, tenant, wasm, limits=config.sandbox_limits(), cache=cache
            )
        finally:
            await store.close()

    try:
        pushed = run(go())
    except ModuleRefused as exc:
        fail(f"{file} refused: {exc}")
    except ControlError as exc:
        fail(str(exc))
    say(pushed.digest)
    if not pushed.new:
        say(f"(already pushed for {tenant})", err=True)


@module_app.command("list")
def module_list(tenant: Annotated[str, typer.Option(help="Tenant whose modules to list.")]) -> None:
    """List a tenant's modules, newest first."""
    from stepfleet.store import PgStore

    config = settings()

    async def go() -> list[tuple[str, int, object]]:
        store = PgStore(config.database_url, pool_size=1)
        try:
            return list(await store.tenant_modules(tenant))
        finally:
            await store.close()

    for digest, size, pushed_at in run(go()):
        say(f"{shown(digest)}  {size:>9} bytes  {pushed_at}")


@app.command()
def create(
    tenant: Annotated[str, typer.Option(help="Tenant the instance belongs to.")],
    module: Annotated[str, typer.Option(help="Digest of a module pushed for the tenant.")],
    params: Annotated[str, typer.Option(help="Params as JSON.")] = "{}",
    instance_id: Annotated[
        str | None, typer.Option("--id", help="Instance id (default: a UUID).")
    ] = None,
    retention_days: Annotated[
        float | None, typer.Option(help="Keep the finished instance this long.")
    ] = None,
) -> None:
    """Publish a create message; print the instance id (the same id twice is one instance)."""
    from stepfleet.client import CreateRequest, Producer

    try:
        parsed = json.loads(params)
    except ValueError as exc:
        fail(f"--params is not JSON: {exc}")
    if not is_digest(module):
        fail(f"--module {module!r} is not a digest (sha256:<64 hex digits>)")
    config = settings()

    async def go() -> str:
        async with Producer(config.amqp_url, config.topology()) as p:
            retention = None if retention_days is None else int(retention_days * 86400)
            return await p.create(
                CreateRequest(tenant, module, parsed, instance_id, retention_seconds=retention)
            )

    try:
        say(shown(run(go())))
    except ValueError as exc:
        fail(str(exc))


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Batches in flight at once.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Deliveries per transaction.")] = None,
) -> None:
    """Run a worker until SIGTERM or SIGINT, then finish in-flight steps and exit 0."""
    import asyncio

    from stepfleet.workers.event_loop import WorkerEventLoop
    from stepfleet.workers.logs import configure_logging
    from stepfleet.workers.worker import Worker

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
        freezing = asyncio.create_task(_freeze_when_ready(node.ready))
        await node.run()
        freezing.cancel()
        # Stopped and drained: a later SIGTERM (the kubelet's, after the pre-stop hook saw
        # `stopped`) must not cut the rest of the exit short.
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    run(go(), loop_factory=WorkerEventLoop)


async def _freeze_when_ready(ready: asyncio.Event) -> None:
    """Keep what a worker's startup made (modules, pools, the sandbox's engine: it lives as long
    as the process) out of the cycle collector's full passes, which otherwise walked all of it
    and held the event loop 50-70 ms every few seconds."""
    await ready.wait()
    gc.freeze()


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


register_instance_commands(app)


@app.command()
def health(
    file: Annotated[
        Path | None, typer.Option(help="Health file (default: STEPFLEET_HEALTH_FILE).")
    ] = None,
    max_age: Annotated[
        float, typer.Option(help="Seconds since the worker last reached its services.")
    ] = 15.0,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Liveness: only ask that the worker still rewrites the file (within --max-age)"
            " and has not stopped, whether or not its services answer.",
        ),
    ] = False,
) -> None:
    """Exit 0 if the worker on this host is ready and reaching PostgreSQL and RabbitMQ.

    For docker compose healthchecks and readiness probes; with --live, for liveness probes.
    Prints one line why.
    """
    from stepfleet.workers.health import judge, judge_alive

    path = file or settings().health_file
    if path is None:
        fail("no health file: set STEPFLEET_HEALTH_FILE or pass --file")
    healthy, why = (judge_alive if live else judge)(path, max_age=max_age)
    say(shown(why))
    if not healthy:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the `stepfleet` script."""
    # Operators run `status` in loops and scripts: a plain call of it skips typer's parsing,
    # whose type coercion imports pydantic (a third of the command's time).
    call = plain_status_call(sys.argv[1:])
    if call is not None and "_STEPFLEET_COMPLETE" not in os.environ:
        standalone(lambda: status(**call))
    app(prog_name="stepfleet")


def standalone(command: Callable[[], None]) -> NoReturn:
    """Run a command function and exit as typer's standalone mode would."""
    try:
        try:
            command()
        except KeyboardInterrupt as exc:
            raise typer.Exit(130) from exc
        except BrokenPipeError:  # a reader such as `head` went away: quietly, status 1
            # What is left to flush at exit goes nowhere (the recipe of Python's docs).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(0)
