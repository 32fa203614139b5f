"""Instance commands: status, list, pause, resume, terminate, restart, delete, event, run."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from stepfleet.cli.common import fail, json_text, run, say, settings, shown
from stepfleet.schemas import InstanceKey, InstanceStatus, JournalEntry, is_tenant

if TYPE_CHECKING:  # each command imports what it uses when it runs
    from stepfleet.control import Control
    from stepfleet.store import HeldEvent, InstanceDetail, InstanceRecord, PgStore

T = TypeVar("T")

Tenant = Annotated[str | None, typer.Option(help="Tenant (needed when ids repeat).")]
InstanceId = Annotated[str, typer.Argument(help="Instance id.")]


@asynccontextmanager
async def _control(*, publish: bool) -> AsyncIterator[tuple[Control, PgStore]]:
    from stepfleet.control import Control
    from stepfleet.store import PgStore

    config = settings()
    topology = config.topology()
    store = PgStore(config.database_url, pool_size=1, retention_seconds=config.retention_seconds)
    broker = None
    if publish:  # aio-pika only for the actions that publish
        from stepfleet.broker import Broker

        broker = Broker(config.amqp_url, topology)
    try:
        if broker is not None:
            await broker.connect(name="stepfleet-cli")
        yield Control(store, broker, topology), store
    finally:
        if broker is not None:
            await broker.close()
        await store.close()


async def _key(store: PgStore, instance_id: str, tenant: str | None) -> InstanceKey:
    from stepfleet.control import ControlError
    from stepfleet.store import LetterFilter

    found = await store.find_instances(instance_id, tenant)
    if not found:
        held = await store.held_events(InstanceKey(tenant, instance_id)) if tenant else []
        letters = await store.dead_letters.find(
            LetterFilter(tenant=tenant, instance_id=instance_id)
        )
        refused = [(letter.id, letter.reason) for letter in letters if letter.kind == "create"]
        raise ControlError(_missing(instance_id, tenant, held, max(refused, default=None)))
    if len(found) > 1:
        raise ControlError(_ambiguous(instance_id, [record for record, _ in found]))
    return found[0][0].key


def _missing(
    instance_id: str,
    tenant: str | None,
    held: Sequence[HeldEvent],
    refused: tuple[int, str] | None = None,
) -> str:
    """Why no instance answers to the id: its create was dead-lettered (`refused`: the newest
    such letter not replayed, and its reason), or it is not created yet: a create the broker
    confirmed waits in its lane until a worker takes it (naming the events held for it)."""
    missing = f"no instance {instance_id!r}" + (f" for tenant {tenant}" if tenant else "")
    if refused is not None:
        letter, reason = refused
        return f"{missing}: its create was dead-lettered ({reason}): stepfleet dlq show {letter}"
    if held:
        return (
            f"{missing} (not created yet: {len(held)} event(s) for it held until "
            f"{_iso(max(h.expires_at for h in held))} for its create)"
        )
    return (
        f"{missing} (not created yet: a create the broker confirmed is queued until a worker "
        "takes it)"
    )


def _ambiguous(instance_id: str, found: Sequence[InstanceRecord]) -> str:
    tenants = ", ".join(record.key.tenant for record in found)
    return f"instance id {instance_id!r} exists for several tenants ({tenants}): pass --tenant"


def _act(
    instance_id: str,
    tenant: str | None,
    action: Callable[[Control, InstanceKey], Awaitable[T]],
    *,
    publish: bool = True,
) -> T:
    from stepfleet.control import ControlError

    async def go() -> T:
        async with _control(publish=publish) as (control, store):
            return await action(control, await _key(store, instance_id, tenant))

    try:
        return run(go())
    except ControlError as exc:
        fail(str(exc))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _ms(entry: JournalEntry) -> float | None:
    if entry.started_at is None or entry.finished_at is None:
        return None
    return round((entry.finished_at - entry.started_at).total_seconds() * 1000, 3)


def _compensating(record: InstanceRecord) -> bool:
    """Whether compensations are running now (never true once the instance is final)."""
    return bool(record.mode) and not record.status.is_final


def _status_json(detail: InstanceDetail) -> dict[str, Any]:
    record = detail.record
    waiting = record.waiting
    return {
        "tenant": record.key.tenant,
        "id": record.key.instance_id,
        "module": record.module,
        "status": record.status.value,
        "params": json.loads(detail.params),
        "output": None if record.output is None else json.loads(record.output),
        "error": record.error,
        "position": record.position,
        "attempt": record.attempt,
        "generation": record.generation,
        "compensating": _compensating(record),
        "stalled": None
        if record.stalled is None
        else {
            "letter": record.stalled.letter_id,
            "reason": record.stalled.reason,
            "at": _iso(record.stalled.at),
        },
        "waiting": None
        if waiting is None
        else {
            "for": waiting.kind.value,
            "name": waiting.name,
            "event_type": waiting.event_type,
            "until": _iso(waiting.wake_at),
        },
        "stored_events": detail.pending_events,
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "finished_at": _iso(record.finished_at),
        "retain_until": _iso(record.retain_until),
        "journal": [
            {
                "seq": e.seq,
                "name": e.name,
                "kind": e.kind.name.lower(),
                "value": e.shown_value,
                "attempt": e.attempt,
                "started_at": _iso(e.started_at),
                "ms": _ms(e),
            }
            for e in detail.journal
        ],
        "failed_attempts": [
            {
                "seq": a.seq,
                "name": a.name,
                "attempt": a.attempt,
                "error": a.error,
                "started_at": _iso(a.started_at),
                "finished_at": _iso(a.finished_at),
            }
            for a in detail.attempts
        ],
    }


def _print_status(detail: InstanceDetail) -> None:
    record = detail.record
    echo = say
    echo(f"instance  {shown(record.key.tenant)}/{shown(record.key.instance_id)}")
    compensating = _compensating(record)
    echo(f"status    {record.status.value}" + ("  (running compensations)" if compensating else ""))
    echo(f"module    {record.module}")
    if record.stalled is not None:
        stall = record.stalled
        echo(
            f"stalled   dead letter {stall.letter_id} ({shown(stall.reason)}) holds its next "
            f"move since {_iso(stall.at)}: stepfleet dlq replay {stall.letter_id}"
        )
    if record.waiting is not None:
        w = record.waiting
        what = f"event {w.event_type!r}" if w.event_type else w.kind.value
        echo(f"waiting   {shown(what)} ({shown(w.name)}) until {_iso(w.wake_at)}")
    if record.output is not None:
        echo(f"output    {shown(record.output)}")
    if record.error is not None:
        echo(f"error     {shown(record.error)}")
    if detail.pending_events:
        echo(f"events    {detail.pending_events} stored, not yet waited for")
    echo(f"journal   {len(detail.journal)} entries")
    failures: dict[int, list[str]] = {}
    for a in detail.attempts:
        failures.setdefault(a.seq, []).append(f"attempt {a.attempt} failed: {shown(a.error)}")
    for entry in detail.journal:
        value = entry.shown_value
        short = value if len(value) <= 60 else value[:57] + "..."
        echo(
            f"  {entry.seq:>4}  {shown(entry.name or '-'):<20} {entry.kind.name.lower():<15} "
            f"attempt {entry.attempt}  {_ms(entry)} ms  {shown(short)}"
        )
        for line in failures.pop(entry.seq, []):
            echo(f"        {line}")
    for seq, lines in sorted(failures.items()):
        for line in lines:
            echo(f"  {seq:>4}  (not recorded yet) {line}")


def status(
    instance_id: InstanceId,
    tenant: Tenant = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show an instance: status, output or error, its journal and failed attempts."""
    detail = _read_status(instance_id, tenant)
    if as_json:
        typer.echo(json_text(_status_json(detail), indent=2))
    else:
        _print_status(detail)


def _read_status(instance_id: str, tenant: str | None) -> InstanceDetail:
    """Read what `status` shows straight through psycopg (no SQLAlchemy, no pydantic: they
    would take most of the command's time to import), answering as the store does."""
    from stepfleet.store.direct import DirectReader, libpq_url
    from stepfleet.store.errors import StoreError
    from stepfleet.workers.environment import database_url

    url = libpq_url(database_url())
    if url is None:  # another driver than psycopg: through the store
        return _act(instance_id, tenant, lambda c, k: c.status(k), publish=False)
    try:
        with DirectReader(url) as reader:
            found = reader.find_instances(instance_id, tenant)
            if not found:
                held = reader.held_events(InstanceKey(tenant, instance_id)) if tenant else []
                refused = reader.refused_create(instance_id, tenant)
                fail(_missing(instance_id, tenant, held, refused))
            if len(found) > 1:
                fail(_ambiguous(instance_id, [record for record, _ in found]))
            detail = reader.detail(found[0][0].key)
    except StoreError as exc:
        fail(f"PostgreSQL: {exc}")
    if detail is None:  # not after finding it: both reads see one snapshot
        fail(_missing(instance_id, tenant, []))
    return detail


def plain_status_call(args: Sequence[str]) -> dict[str, Any] | None:
    """The arguments of `status` when `args` are a plain call of it: `status ID`, with
    `--tenant T` and `--json` at most once each, in any order. None for anything else (help,
    `--tenant=T`, `--`, an unknown or repeated option, a value that starts with `-`): typer
    parses those as usual, with its own messages."""
    if not args or args[0] != "status":
        return None
    call: dict[str, Any] = {"tenant": None, "as_json": False}
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--json" and not call["as_json"]:
            call["as_json"] = True
        elif arg == "--tenant" and call["tenant"] is None:
            value = next(rest, None)
            if value is None or value.startswith("-"):
                return None
            call["tenant"] = value
        elif not arg.startswith("-") and "instance_id" not in call:
            call["instance_id"] = arg
        else:
            return None
    return call if "instance_id" in call else None


def list_instances(
    tenant: Annotated[str, typer.Option(help="Tenant whose instances to list.")],
    status_filter: Annotated[
        list[InstanceStatus] | None, typer.Option("--status", help="Only these statuses.")
    ] = None,
    stalled: Annotated[
        bool, typer.Option("--stalled", help="Only instances marked stalled by a dead letter.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List a tenant's instances, newest first."""
    if not is_tenant(tenant):
        fail(f"{tenant!r} is not a tenant name")

    async def go() -> list[InstanceRecord]:
        async with _control(publish=False) as (control, _):
            return await control.list_instances(
                tenant, statuses=status_filter or (), stalled=stalled, limit=limit
            )

    for record in run(go()):
        if as_json:
            typer.echo(
                json_text(
                    {
                        "id": record.key.instance_id,
                        "status": record.status.value,
                        "module": record.module,
                        "position": record.position,
                        "created_at": _iso(record.created_at),
                        "error": record.error,
                        "stalled": None
                        if record.stalled is None
                        else {
                            "letter": record.stalled.letter_id,
                            "reason": record.stalled.reason,
                        },
                    }
                )
            )
        else:
            stall = record.stalled
            say(
                f"{shown(record.key.instance_id):<40} {record.status.value:<10} "
                f"{record.position:>6} entries  {_iso(record.created_at)}"
                + (
                    ""
                    if stall is None
                    else f"  stalled: letter {stall.letter_id} ({shown(stall.reason)})"
                )
            )


def pause(instance_id: InstanceId, tenant: Tenant = None) -> None:
    """Pause an instance between steps (it stays paused until resumed, whatever restarts)."""
    _act(instance_id, tenant, lambda c, k: c.pause(k))
    say(f"{shown(instance_id)} paused")


def resume(instance_id: InstanceId, tenant: Tenant = None) -> None:
    """Resume a paused instance where it stopped."""
    _act(instance_id, tenant, lambda c, k: c.resume(k))
    say(f"{shown(instance_id)} resumed")


def terminate(
    instance_id: InstanceId,
    tenant: Tenant = None,
    rollback: Annotated[
        bool, typer.Option(help="Run the compensations of completed steps first.")
    ] = False,
) -> None:
    """Stop an instance for good and cancel its timers."""
    _act(instance_id, tenant, lambda c, k: c.terminate(k, rollback=rollback))
    say(
        f"{shown(instance_id)} terminating: compensations run first (see status)"
        if rollback
        else f"{shown(instance_id)} terminated"
    )


def restart(
    instance_id: InstanceId,
    tenant: Tenant = None,
    from_step: Annotated[
        str | None, typer.Option(help="Keep the journal before the first step of this name.")
    ] = None,
) -> None:
    """Run an instance again on its pinned module, from the start or from a named step."""
    record = _act(instance_id, tenant, lambda c, k: c.restart(k, from_step=from_step))
    say(f"{shown(instance_id)} restarted at journal position {record.position}")


def delete(instance_id: InstanceId, tenant: Tenant = None) -> None:
    """Delete a finished instance with its journal and events."""
    _act(instance_id, tenant, lambda c, k: c.delete(k), publish=False)
    say(f"{shown(instance_id)} deleted")


def event(
    instance_id: InstanceId,
    tenant: Annotated[str, typer.Option(help="Tenant the instance belongs to.")],
    event_type: Annotated[str, typer.Option("--type", help="Event type the workflow waits for.")],
    payload: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    event_id: Annotated[
        str | None, typer.Option("--event-id", help="Idempotency key (default: a UUID).")
    ] = None,
) -> None:
    """Send an event to an instance; print the event id."""
    from stepfleet.client import EventRequest, Producer

    try:
        parsed = json.loads(payload)
    except ValueError as exc:
        fail(f"--payload is not JSON: {exc}")
    config = settings()

    async def go() -> str:
        async with Producer(config.amqp_url, config.topology()) as p:
            return await p.send_event(
                EventRequest(tenant, instance_id, event_type, parsed, event_id)
            )

    try:
        say(shown(run(go())))
    except ValueError as exc:
        fail(str(exc))


def run_local(
    module: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    params: Annotated[str, typer.Option(help="Params as JSON.")] = "{}",
    events: Annotated[
        list[str] | None,
        typer.Option("--event", help="TYPE=JSON, an event sent before the run (repeatable)."),
    ] = None,
) -> None:
    """Run a workflow locally, with no RabbitMQ or PostgreSQL; sleeps are skipped.

    Exits 0 when the workflow completes, 1 when it fails.
    """
    from stepfleet.sandbox import InvalidModule
    from stepfleet.workers.local import parse_event, run_locally

    try:
        parsed = json.dumps(json.loads(params), separators=(",", ":"))
        sent = [parse_event(text) for text in events or []]
    except ValueError as exc:
        fail(f"--params is not JSON: {exc}" if "event" not in str(exc) else str(exc))
    config = settings()
    try:
        result = run_locally(
            module.read_bytes(),
            parsed,
            events=sent,
            say=lambda line: say(shown(line)),
            limits=config.engine_limits(),
            sandbox_limits=config.sandbox_limits(),
        )
    except InvalidModule as exc:
        fail(f"{module} refused: {exc}")
    if result.status is not InstanceStatus.COMPLETE:
        raise typer.Exit(1)


def register_instance_commands(app: typer.Typer) -> None:
    """Add the instance commands to the `stepfleet` app."""
    app.command()(status)
    app.command("list")(list_instances)
    for command in (pause, resume, terminate, restart, delete, event):
        app.command()(command)
    app.command("run")(run_local)
