"""`stepfleet dlq ...`, `stepfleet retry` and `stepfleet audit`: the on-call engineer's tools."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from stepfleet.cli.common import fail, json_text, run, say, settings, shown
from stepfleet.schemas import InstanceKey

if TYPE_CHECKING:  # each command imports what it uses when it runs
    from stepfleet.broker import Broker
    from stepfleet.control import DeadLetters
    from stepfleet.control.dead_letters import Outcome
    from stepfleet.store import AuditEntry, DeadLetter, InstanceRecord, LetterFilter, PgStore

T = TypeVar("T")

dlq_app = typer.Typer(
    no_args_is_help=True, help="Dead letters: list, show, replay, purge and export the archive."
)

Tenant = Annotated[str | None, typer.Option(help="Only this tenant's letters.")]
Reason = Annotated[str | None, typer.Option(help="Only letters with this reason.")]
Instance = Annotated[str | None, typer.Option("--instance", help="Only this instance id.")]


def parse_time(text: str) -> datetime:
    """An ISO 8601 time, with an offset (`+01:00`, `Z`) or without one, which is UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 time (e.g. 2026-11-22T10:00, 2026-11-22T10:00+01:00)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


_TIME = "ISO 8601, e.g. 2026-11-22T10:00 or 2026-11-22T10:00+01:00; without an offset: UTC"
Since = Annotated[
    datetime | None,
    typer.Option(parser=parse_time, metavar="TIME", help=f"Archived at or after TIME ({_TIME})."),
]
Until = Annotated[
    datetime | None,
    typer.Option(parser=parse_time, metavar="TIME", help=f"Archived before TIME ({_TIME})."),
]
Replayed = Annotated[bool, typer.Option("--replayed", help="Include replayed letters.")]
Stalled = Annotated[
    bool,
    typer.Option("--stalled", help="Only letters that left their instance stalled (still marked)."),
]


def _filter(
    tenant: str | None,
    reason: str | None,
    instance: str | None,
    since: datetime | None,
    until: datetime | None,
    replayed: bool = False,
    ids: tuple[int, ...] = (),
    limit: int | None = None,
    stalled: bool = False,
) -> LetterFilter:
    from stepfleet.store import LetterFilter

    return LetterFilter(
        stalled=stalled,
        ids=ids,
        tenant=tenant,
        reason=reason,
        instance_id=instance,
        since=since,
        until=until,
        include_replayed=replayed,
        limit=limit,
    )


@asynccontextmanager
async def _services(*, publish: bool) -> AsyncIterator[tuple[PgStore, Broker | None]]:
    from stepfleet.store import PgStore

    config = settings()
    store = PgStore(config.database_url, pool_size=1, retention_seconds=config.retention_seconds)
    broker = None
    if publish:  # aio-pika only for the commands that publish
        from stepfleet.broker import Broker

        broker = Broker(config.amqp_url, config.topology())
    try:
        if broker is not None:
            await broker.connect(name="stepfleet-cli")
        yield store, broker
    finally:
        if broker is not None:
            await broker.close()
        await store.close()


def _go(work: Callable[[PgStore, Broker | None], Awaitable[T]], *, publish: bool = False) -> T:
    from stepfleet.control import ControlError

    async def go() -> T:
        async with _services(publish=publish) as (store, broker):
            return await work(store, broker)

    try:
        return run(go())
    except ControlError as exc:
        fail(str(exc))


def _summary(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "received_at": letter.received_at.isoformat(),
        "reason": letter.reason,
        "tenant": letter.tenant,
        "instance": letter.instance_id,
        "kind": letter.kind,
        "module": letter.module,
        "detail": letter.detail,
        "replayed_at": letter.replayed_at.isoformat() if letter.replayed_at else None,
    }


def _full(letter: DeadLetter) -> dict[str, Any]:
    try:
        body: Any = json.loads(letter.body)
    except ValueError:
        body = letter.body.decode("utf-8", "backslashreplace")
    return {
        **_summary(letter),
        "routing_key": letter.routing_key,
        "message_id": letter.message_id,
        "replayed_by": letter.replayed_by,
        "source": letter.source,
        "sender": letter.sender,
        "first_exchange": letter.first_exchange,
        "unreplayable": letter.unreplayable,
        "headers": letter.headers,
        "body": body,
        "body_size": letter.body_size,
        "body_sha256": letter.body_sha256,
        "body_kept": len(letter.body),
        "body_truncated": letter.body_truncated,
        "context": letter.context,
        "deliveries": letter.headers.get("x-death", []),
    }


@dlq_app.command("list")
def list_letters(
    tenant: Tenant = None,
    reason: Reason = None,
    instance: Instance = None,
    since: Since = None,
    until: Until = None,
    replayed: Replayed = False,
    stalled: Stalled = False,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List archived dead letters, oldest first."""
    selected = _filter(
        tenant, reason, instance, since, until, replayed, limit=limit, stalled=stalled
    )
    letters = _go(lambda store, _: store.dead_letters.find(selected))
    for letter in letters:
        if as_json:
            typer.echo(json_text(_summary(letter)))
        else:
            say(
                f"{letter.id:>7}  {letter.received_at:%Y-%m-%d %H:%M:%S}  "
                f"{shown(letter.reason):<20} {shown(letter.tenant or '-'):<16} "
                f"{shown(letter.instance_id or '-'):<28} "
                f"{'replayed' if letter.replayed_at else ''}"
            )
    if not as_json:
        say(f"{len(letters)} letter(s)", err=True)


@dlq_app.command("show")
def show(letter_id: Annotated[int, typer.Argument(help="Letter id (from dlq list).")]) -> None:
    """Show one letter: reason, headers, body, delivery history and workflow context."""
    found = _go(
        lambda store, _: store.dead_letters.find(
            _filter(None, None, None, None, None, replayed=True, ids=(letter_id,))
        )
    )
    if not found:
        fail(f"no dead letter {letter_id}")
    typer.echo(json_text(_full(found[0]), indent=2, default=str))


def _confirm(count: int, what: str, yes: bool) -> None:
    if count == 0:
        say(f"nothing to {what}")
        raise typer.Exit(0)
    if not yes and not typer.confirm(f"{what} {count} dead letter(s)?"):
        raise typer.Exit(1)


def _bulk(
    count: int,
    label: str,
    action: Callable[[DeadLetters, Callable[[int], None]], Awaitable[Outcome]],
    *,
    publish: bool,
) -> Outcome:
    """Run a replay or purge over `count` letters with a progress bar on a terminal."""
    from rich.progress import Progress

    from stepfleet.control import DeadLetters

    config = settings()

    async def work(store: PgStore, broker: Broker | None) -> Outcome:
        letters = DeadLetters(
            store,
            broker,
            config.topology(),
            user_id=config.broker_user,
            trusted_users=config.trusted_users,
        )
        with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task(label, total=count)
            return await action(letters, lambda n: progress.advance(task, n))

    return _go(work, publish=publish)


@dlq_app.command("replay")
def replay(
    letter_ids: Annotated[list[int] | None, typer.Argument(help="Letter ids.")] = None,
    tenant: Tenant = None,
    reason: Reason = None,
    instance: Instance = None,
    since: Since = None,
    until: Until = None,
    stalled: Stalled = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Publish letters again (with confirms), each at most once, by id or by filter."""
    if not letter_ids and not any((tenant, reason, instance, since, until, stalled)):
        fail(
            "name letter ids or a filter "
            "(--tenant, --reason, --instance, --since, --until, --stalled)"
        )
    # Letters named by id are looked at even when replayed already, to say so.
    selected = _filter(
        tenant,
        reason,
        instance,
        since,
        until,
        bool(letter_ids),
        ids=tuple(letter_ids or ()),
        stalled=stalled,
    )
    count = _go(lambda store, _: store.dead_letters.count(selected))
    if letter_ids:
        known = _go(lambda store, _: store.dead_letters.find(selected))
        missing = set(letter_ids) - {letter.id for letter in known}
        if missing:
            fail(f"no dead letter {', '.join(str(i) for i in sorted(missing))}")
    else:
        _confirm(count, "replay", yes)
    outcome = _bulk(
        count,
        "replaying",
        lambda letters, advance: letters.replay(selected, progress=advance),
        publish=True,
    )
    for letter_id, why in sorted(outcome.skipped.items()):
        say(f"{letter_id}: not replayed: {shown(why)}", err=True)
    say(f"{len(outcome.done)} letter(s) replayed")


@dlq_app.command("purge")
def purge(
    tenant: Tenant = None,
    reason: Reason = None,
    instance: Instance = None,
    since: Since = None,
    until: Until = None,
    replayed: Replayed = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete archived letters for good (asks first unless --yes)."""
    selected = _filter(tenant, reason, instance, since, until, replayed)
    count = _go(lambda store, _: store.dead_letters.count(selected))
    _confirm(count, "purge", yes)
    outcome = _bulk(
        count,
        "purging",
        lambda letters, advance: letters.purge(selected, progress=advance),
        publish=False,
    )
    say(f"{len(outcome.done)} letter(s) purged")


@dlq_app.command("export")
def export(
    tenant: Tenant = None,
    reason: Reason = None,
    instance: Instance = None,
    since: Since = None,
    until: Until = None,
    replayed: Replayed = False,
) -> None:
    """Print the selected letters as JSON lines (headers, body, context)."""
    selected = _filter(tenant, reason, instance, since, until, replayed)
    for letter in _go(lambda store, _: store.dead_letters.find(selected)):
        typer.echo(json_text(_full(letter), default=str))


def retry(
    instance_id: Annotated[str | None, typer.Argument(help="Instance id.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant (for bulk, required).")] = None,
    module: Annotated[str | None, typer.Option(help="Bulk: only instances of this digest.")] = None,
    error: Annotated[str | None, typer.Option(help="Bulk: only errors containing this.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Run failed (errored) instances again from the step that failed, one or in bulk."""
    from rich.progress import Progress

    from stepfleet.control import Control, ControlError

    config = settings()
    topology = config.topology()
    if instance_id is None and tenant is None:
        fail("name an instance id, or --tenant (with --module / --error) for a bulk retry")

    async def targets(store: PgStore, broker: Broker | None) -> list[InstanceKey]:
        control = Control(store, broker, topology)
        if instance_id is not None:
            found = await store.find_instances(instance_id, tenant)
            if len(found) != 1:
                raise ControlError(
                    f"no instance {instance_id!r}" if not found else "several tenants: --tenant"
                )
            return [found[0][0].key]
        assert tenant is not None
        failed: list[InstanceRecord] = await control.failed_instances(
            tenant, module=module, error_contains=error
        )
        return [record.key for record in failed]

    keys = _go(targets)
    if instance_id is None:
        if not keys:
            say("no failed instance matches")
            raise typer.Exit(0)
        if not yes and not typer.confirm(f"retry {len(keys)} failed instance(s)?"):
            raise typer.Exit(1)

    async def action(store: PgStore, broker: Broker | None) -> list[InstanceKey]:
        control = Control(store, broker, topology)
        done: list[InstanceKey] = []
        with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task("retrying", total=len(keys))
            for key in keys:
                try:
                    await control.retry(key)
                    done.append(key)
                except ControlError as exc:
                    say(f"{shown(key.instance_id)}: {shown(exc)}", err=True)
                progress.advance(task)
        return done

    done = _go(action, publish=True)
    say(f"{len(done)} instance(s) retried")
    if instance_id is not None and not done:
        raise typer.Exit(1)


def audit(
    limit: Annotated[int, typer.Option(min=1)] = 50,
    action: Annotated[str | None, typer.Option(help="Only this action.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Show the operator audit log, newest first."""
    entries: list[AuditEntry] = _go(
        lambda store, _: store.dead_letters.audit_entries(limit=limit, action=action)
    )
    for entry in entries:
        if as_json:
            typer.echo(
                json_text(
                    {
                        "at": entry.at.isoformat() if entry.at else None,
                        "actor": entry.actor,
                        "action": entry.action,
                        "target": entry.target,
                        "filter": entry.filter,
                        "count": entry.count,
                        "detail": entry.detail,
                    }
                )
            )
        else:
            say(
                f"{entry.at:%Y-%m-%d %H:%M:%S}  {shown(entry.actor):<24} "
                f"{shown(entry.action):<12} {entry.count:>5}  {shown(entry.target[:60])}  "
                f"{json_text(entry.filter, default=str) if entry.filter else ''}"
            )


def register_operations_commands(app: typer.Typer) -> None:
    """Add `dlq`, `retry` and `audit` to the `stepfleet` app."""
    app.add_typer(dlq_app, name="dlq")
    app.command()(retry)
    app.command()(audit)
