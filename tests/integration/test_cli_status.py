"""`stepfleet status` reads PostgreSQL through psycopg alone, and shows exactly what the store's
reads show: the same text, the same JSON, the same errors and exit codes, in every state an
instance can be in. Each case is printed three ways and compared: through the store (the
SQLAlchemy path, taken for database URLs of other drivers), through the direct reads inside
the CLI, and by the `stepfleet` script in a process of its own (where a plain call skips
typer's parsing)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from stepfleet.cli.main import app
from stepfleet.schemas import (
    EntryFlags,
    EntryKind,
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    RunMode,
    TenantLimits,
    Waiting,
    WaitKind,
    digest_of,
)
from stepfleet.store import (
    EarlyEvent,
    InstanceDetail,
    LetterFilter,
    NewDeadLetter,
    NewEvent,
    NewInstance,
    OutboxMessage,
    PgStore,
    StepWrite,
)
from stepfleet.store.direct import DirectReader, libpq_url

pytestmark = pytest.mark.services

HOSTILE = "\x1b]52;c;Zm9v\x07\u202eboom\r\nstatus    complete"
BEGAN = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Shown:
    exit_code: int
    stdout: str
    stderr: str


@dataclass
class Fleet:
    """A tenant of this test's own, with a pushed module, in this run's database."""

    store: PgStore
    url: str
    tenant: str
    module: str
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    """Makes this test's ids unique in the run's database (status without --tenant)."""

    def key(self, name: str) -> InstanceKey:
        return InstanceKey(self.tenant, f"{name}-{self.suffix}")

    async def instance(self, name: str, *writes: StepWrite, params: str = '{"n": 1}') -> str:
        key = self.key(name)
        async with self.store.transaction() as tx:
            await tx.create_instances([NewInstance(key, self.module, params)])
        for write in writes:
            async with self.store.transaction() as tx:
                await tx.write_batch([write], [])
        return key.instance_id

    def shown(self, *args: str, through_store: bool = False) -> Shown:
        """`stepfleet ARGS` inside this process, through the store or the direct reads."""
        runner = CliRunner()
        if through_store:
            env = {"STEPFLEET_DATABASE_URL": self.url.replace("+psycopg:", "+psycopg_async:")}
        else:
            env = {"STEPFLEET_DATABASE_URL": self.url}
        result = runner.invoke(app, list(args), env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Shown(result.exit_code, result.stdout, result.stderr)

    def script(self, *args: str) -> Shown:
        """`stepfleet ARGS` as an operator types it, in a process of its own."""
        done = subprocess.run(
            [sys.executable, "-m", "stepfleet", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "STEPFLEET_DATABASE_URL": self.url},
            timeout=60,
        )
        return Shown(done.returncode, done.stdout, done.stderr)

    async def same_everywhere(self, *args: str) -> Shown:
        """What `stepfleet ARGS` prints, after checking that all three ways print it."""
        before = await asyncio.to_thread(self.shown, *args, through_store=True)
        direct = await asyncio.to_thread(self.shown, *args)
        script = await asyncio.to_thread(self.script, *args)
        assert direct == before
        assert script == before
        return before


@pytest.fixture
async def fleet(store: PgStore, database_url: str) -> Fleet:
    tenant = f"st-{uuid.uuid4().hex[:8]}"
    await store.tenants.add(tenant, None, TenantLimits())
    wasm = b"\0asm\1\0\0\0" + tenant.encode()
    module = digest_of(wasm)
    await store.put_module(tenant, module, wasm)
    return Fleet(store, database_url, tenant, module)


def entry(
    seq: int,
    name: str,
    kind: EntryKind = EntryKind.STEP_SUCCEEDED,
    value: str = '{"ok":true}',
    *,
    attempt: int = 1,
    flags: EntryFlags = EntryFlags.NONE,
) -> JournalEntry:
    at = BEGAN + timedelta(seconds=seq)
    return JournalEntry(seq, kind, name, value, attempt, at, at + timedelta(milliseconds=7), flags)


def failure(seq: int, name: str, attempt: int, error: str) -> FailedAttempt:
    at = BEGAN + timedelta(seconds=seq, milliseconds=attempt)
    return FailedAttempt(seq, name, attempt, error, at, at + timedelta(milliseconds=3))


async def both_views(fleet: Fleet, instance_id: str) -> tuple[str, dict[str, object]]:
    """The text and the JSON of a found instance, each the same all three ways."""
    human = await fleet.same_everywhere("status", instance_id)
    as_json = await fleet.same_everywhere("status", instance_id, "--tenant", fleet.tenant, "--json")
    assert human.exit_code == 0 == as_json.exit_code, human.stderr + as_json.stderr
    assert human.stderr == ""
    return human.stdout, json.loads(as_json.stdout)


async def test_a_running_instance(fleet: Fleet) -> None:
    name = await fleet.instance(
        "running",
        StepWrite(
            fleet.key("running"),
            InstanceStatus.RUNNING,
            3,
            (
                entry(0, "", EntryKind.NOW, "1767225600000"),
                entry(1, "reserve", value='{"items":3}', flags=EntryFlags.HAS_ROLLBACK),
                entry(2, "card", value='"4111"', flags=EntryFlags.SENSITIVE),
            ),
        ),
    )
    human, shown = await both_views(fleet, name)
    assert shown["status"] == "running"
    assert [e["kind"] for e in shown["journal"]] == ["now", "step_succeeded", "step_succeeded"]
    assert shown["journal"][2]["value"] == "<redacted>"
    assert "status    running\n" in human
    assert "4111" not in human


async def test_a_sleeping_instance_with_events_stored(fleet: Fleet) -> None:
    key = fleet.key("sleeping")
    wake = datetime.now(UTC) + timedelta(hours=1)
    name = await fleet.instance(
        "sleeping",
        StepWrite(
            key,
            InstanceStatus.SLEEPING,
            1,
            (entry(0, "schedule"),),
            waiting=Waiting(WaitKind.SLEEP, "until-due", wake),
        ),
    )
    async with fleet.store.transaction() as tx:
        await tx.insert_events([NewEvent(key, "e-1", "reminder.ack", '{"ok":true}')])
    human, shown = await both_views(fleet, name)
    assert shown["waiting"] == {
        "for": "sleep",
        "name": "until-due",
        "event_type": None,
        "until": wake.isoformat(),
    }
    assert shown["stored_events"] == 1
    assert "events    1 stored, not yet waited for" in human


async def test_a_waiting_instance_stalled_by_a_dead_letter(fleet: Fleet) -> None:
    key = fleet.key("stalled")
    name = await fleet.instance(
        "stalled",
        StepWrite(
            key,
            InstanceStatus.WAITING,
            1,
            (entry(0, "ask"),),
            waiting=Waiting(
                WaitKind.EVENT, "reply", BEGAN + timedelta(days=1), "reply", 86_400_000
            ),
        ),
    )
    engine = create_async_engine(fleet.url)
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "UPDATE instances SET stalled_letter = 42, stalled_reason = 'delivery-limit', "
                "stalled_at = now() WHERE tenant = :tenant AND id = :id"
            ),
            {"tenant": key.tenant, "id": key.instance_id},
        )
    await engine.dispose()
    human, shown = await both_views(fleet, name)
    assert shown["stalled"]["letter"] == 42  # type: ignore[index]
    assert "stepfleet dlq replay 42" in human


async def test_a_completed_instance_with_retries(fleet: Fleet) -> None:
    key = fleet.key("complete")
    name = await fleet.instance(
        "complete",
        StepWrite(
            key,
            InstanceStatus.RUNNING,
            1,
            (entry(0, "charge"),),
            failed_attempt=failure(1, "ship", 1, "carrier down"),
        ),
        StepWrite(
            key,
            InstanceStatus.COMPLETE,
            2,
            (entry(1, "ship", value='{"tracking":"T-1"}', attempt=2),),
            output='{"order":"A-1","tracking":"T-1"}',
        ),
    )
    human, shown = await both_views(fleet, name)
    assert shown["status"] == "complete"
    assert shown["output"] == {"order": "A-1", "tracking": "T-1"}
    assert shown["failed_attempts"][0]["error"] == "carrier down"  # type: ignore[index]
    assert shown["finished_at"] is not None
    assert "attempt 1 failed: carrier down" in human


async def test_an_errored_instance_after_its_compensations(fleet: Fleet) -> None:
    key = fleet.key("errored")
    steps = (
        entry(0, "reserve", flags=EntryFlags.HAS_ROLLBACK),
        entry(1, "charge", flags=EntryFlags.HAS_ROLLBACK),
    )
    name = await fleet.instance(
        "errored",
        StepWrite(
            key,
            InstanceStatus.RUNNING,
            2,
            steps,
            mode=RunMode.COMPENSATE,
            end_status=InstanceStatus.ERRORED,
            error=HOSTILE,
            failed_attempt=failure(2, "ship", 1, HOSTILE),
        ),
    )
    compensating, shown = await both_views(fleet, name)
    assert shown["compensating"] is True
    assert "(running compensations)" in compensating
    undone = tuple(
        entry(seq, step, EntryKind.COMPENSATED, "null", flags=EntryFlags.COMPENSATION)
        for seq, step in ((2, "charge"), (3, "reserve"))
    )
    async with fleet.store.transaction() as tx:
        await tx.write_batch(
            [
                StepWrite(
                    key,
                    InstanceStatus.ERRORED,
                    4,
                    undone,
                    mode=RunMode.COMPENSATE,
                    end_status=InstanceStatus.ERRORED,
                    error=HOSTILE,
                )
            ],
            [],
        )
    human, shown = await both_views(fleet, name)
    assert shown["status"] == "errored"
    assert shown["compensating"] is False
    assert shown["error"] == HOSTILE
    assert [e["kind"] for e in shown["journal"]][2:] == ["compensated", "compensated"]
    assert "(running compensations)" not in human
    assert "\\x1b]52;c;Zm9v\\x07\\u202eboom\\r\\nstatus    complete" in human
    assert "\x1b" not in human


async def test_a_confirmed_create_not_processed_yet_names_its_held_events(fleet: Fleet) -> None:
    """No row yet: the same `no instance` answer and exit status 1, naming the held events
    when the tenant is given."""
    key = fleet.key("later")
    early = EarlyEvent(
        NewEvent(key, "ev-1", "go", "null"),
        OutboxMessage("dead.unknown-instance", "{}", b"null", "test.dead"),
    )
    async with fleet.store.transaction() as tx:
        assert (await tx.hold_early_events([early], hold_seconds=600)).existing == set()
    later = key.instance_id
    held = await fleet.same_everywhere("status", later, "--tenant", fleet.tenant)
    assert held.exit_code == 1
    assert held.stdout == ""
    assert held.stderr.startswith(
        f"error: no instance '{later}' for tenant {fleet.tenant} (not created yet: 1 event(s)"
    )
    bare = await fleet.same_everywhere("status", later)
    assert (bare.exit_code, bare.stderr) == (1, f"error: no instance '{later}'{QUEUED}\n")


QUEUED = " (not created yet: a create the broker confirmed is queued until a worker takes it)"


async def test_an_unknown_id(fleet: Fleet) -> None:
    never = fleet.key("never").instance_id
    unknown = await fleet.same_everywhere("status", never, "--tenant", fleet.tenant, "--json")
    assert (unknown.exit_code, unknown.stdout) == (1, "")
    assert unknown.stderr == f"error: no instance '{never}' for tenant {fleet.tenant}{QUEUED}\n"


async def test_an_id_whose_create_was_dead_lettered_names_the_letter(
    fleet: Fleet, store: PgStore
) -> None:
    refused = fleet.key("refused")
    letter = NewDeadLetter(
        letter_key=f"test/{refused.instance_id}",
        reason="unknown-module",
        detail="module was never pushed for the tenant",
        routing_key=f"{fleet.tenant}.create",
        headers={},
        body=b"{}",
        tenant=fleet.tenant,
        instance_id=refused.instance_id,
        kind="create",
    )
    await store.dead_letters.archive([letter])
    [archived] = await store.dead_letters.find(LetterFilter(instance_id=refused.instance_id))
    for args in (("--tenant", fleet.tenant), ()):
        shown = await fleet.same_everywhere("status", refused.instance_id, *args)
        assert shown.exit_code == 1
        assert shown.stderr.endswith(
            f": its create was dead-lettered (unknown-module): stepfleet dlq show {archived.id}\n"
        )


async def test_an_id_in_two_tenants_needs_the_tenant(fleet: Fleet, store: PgStore) -> None:
    other = Fleet(store, fleet.url, f"st-{uuid.uuid4().hex[:8]}", fleet.module)
    await store.tenants.add(other.tenant, None, TenantLimits())
    await store.put_module(other.tenant, fleet.module, b"\0asm\1\0\0\0" + fleet.tenant.encode())
    other.suffix = fleet.suffix
    shared = await fleet.instance("twice")
    await other.instance("twice")
    both = await fleet.same_everywhere("status", shared)
    assert both.exit_code == 1
    assert "exists for several tenants" in both.stderr
    one = await fleet.same_everywhere("status", shared, "--tenant", other.tenant)
    assert one.exit_code == 0


async def test_an_unreachable_database_is_one_line(fleet: Fleet) -> None:
    nowhere = Fleet(fleet.store, "postgresql+psycopg://postgres@127.0.0.1:1/x", "t", "m")
    refused = await nowhere.same_everywhere("status", "any")  # never reaches a database
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: PostgreSQL: connection failed:")
    assert refused.stderr.count("\n") == 1


async def test_the_direct_reads_answer_as_the_store_does(fleet: Fleet) -> None:
    """Record for record, not only as printed."""
    key = fleet.key("compared")
    await fleet.instance(
        "compared",
        StepWrite(
            key,
            InstanceStatus.SLEEPING,
            2,
            (entry(0, "a"), entry(1, "b", attempt=3)),
            waiting=Waiting(WaitKind.RETRY, "c", BEGAN + timedelta(hours=2)),
            failed_attempt=failure(2, "c", 1, "nope"),
        ),
    )
    url = libpq_url(fleet.url)
    assert url is not None
    with DirectReader(url) as reader:
        direct: list[object] = [
            reader.detail(key),
            reader.find_instances(key.instance_id),
            reader.find_instances(key.instance_id, fleet.tenant),
            reader.held_events(key),
            reader.detail(fleet.key("absent")),
        ]
    stored: list[object] = [
        await fleet.store.detail(key),
        await fleet.store.find_instances(key.instance_id),
        await fleet.store.find_instances(key.instance_id, fleet.tenant),
        await fleet.store.held_events(key),
        await fleet.store.detail(fleet.key("absent")),
    ]
    assert direct == stored
    assert isinstance(direct[0], InstanceDetail)
