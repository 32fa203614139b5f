"""`stepfleet module move|pause|resume`: running instances and the code they run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from stepfleet.cli.common import fail, run, say, settings, shown
from stepfleet.schemas import InstanceKey, is_digest

if TYPE_CHECKING:  # each command imports what it uses when it runs
    from stepfleet.control import MoveCheck

Tenant = Annotated[str, typer.Option(help="Tenant whose instances to act on.")]


def _digest(value: str, option: str) -> str:
    if not is_digest(value):
        fail(f"{option} {value!r} is not a digest (sha256:<64 hex digits>)")
    return value


def move(
    tenant: Tenant,
    to: Annotated[str, typer.Option("--to", help="Digest to move the instances to.")],
    from_module: Annotated[
        str | None, typer.Option("--from", help="Only instances on this digest.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Replay every journal against --to and report; change nothing.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Move instances whose replay does not match too.")
    ] = False,
) -> None:
    """Move a tenant's running instances to another module (a rollout or a rollback).

    Each instance's journal is replayed against the new code first; only those that replay
    cleanly are moved unless --force. Exits 1 when some instance would not replay.
    """
    from stepfleet.control import ControlError, Verdict, move_module
    from stepfleet.store import PgStore

    _digest(to, "--to")
    if from_module is not None:
        _digest(from_module, "--from")
    config = settings()

    async def go() -> list[MoveCheck]:
        store = PgStore(config.database_url, pool_size=1)
        try:
            return await move_module(
                store,
                config.sandbox_limits(),
                tenant,
                to,
                from_module=from_module,
                dry_run=dry_run,
                force=force,
            )
        finally:
            await store.close()

    try:
        checks = run(go())
    except ControlError as exc:
        fail(str(exc))
    for check in checks:
        action = "" if dry_run else ("moved" if check.moved else "kept")
        say(
            f"{shown(check.key.instance_id):<40} {check.verdict.value:<17} {action:<6} "
            f"{shown(check.detail)}"
        )
    bad = sum(1 for c in checks if c.verdict is not Verdict.COMPATIBLE)
    moved = sum(1 for c in checks if c.moved)
    summary = f"{len(checks)} instance(s) checked, {bad} would not replay cleanly"
    say(summary + ("" if dry_run else f", {moved} moved"))
    if bad:
        raise typer.Exit(1)


def _bulk(tenant: str, digest: str, *, resume: bool) -> list[InstanceKey]:
    from stepfleet.broker import Broker
    from stepfleet.control import Control
    from stepfleet.store import PgStore

    config = settings()
    topology = config.topology()

    async def go() -> list[InstanceKey]:
        store = PgStore(config.database_url, pool_size=1)
        broker = Broker(config.amqp_url, topology)
        try:
            await broker.connect(name="stepfleet-cli")
            control = Control(store, broker, topology)
            if resume:
                return await control.resume_module(tenant, digest)
            return await control.pause_module(tenant, digest)
        finally:
            await broker.close()
            await store.close()

    return run(go())


def pause(digest: Annotated[str, typer.Argument(help="Module digest.")], tenant: Tenant) -> None:
    """Pause every running instance of a module (they stop between steps)."""
    paused = _bulk(tenant, _digest(digest, "DIGEST"), resume=False)
    say(f"{len(paused)} instance(s) of {digest} paused")


def resume(digest: Annotated[str, typer.Argument(help="Module digest.")], tenant: Tenant) -> None:
    """Resume every paused instance of a module."""
    resumed = _bulk(tenant, _digest(digest, "DIGEST"), resume=True)
    say(f"{len(resumed)} instance(s) of {digest} resumed")


def register_module_commands(module_app: typer.Typer) -> None:
    """Add move, pause and resume to `stepfleet module`."""
    module_app.command()(move)
    module_app.command()(pause)
    module_app.command()(resume)
