"""The `stepfleet` command against the real services, as an operator types it."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from typer.testing import CliRunner

from stepfleet.broker import Outgoing
from stepfleet.cli.main import app
from stepfleet.sandbox import CompiledModuleCache, WasmSandbox
from stepfleet.schemas import InstanceKey, InstanceStatus, TenantLimits, digest_of
from tests.conftest import EXAMPLES, ORDER_OUTPUT, ORDER_PARAMS
from tests.integration.conftest import wait_for_status, wait_until
from tests.integration.test_dead_letters import archived_for
from tests.wasm_bombs import CALLS_BODY, guest

pytestmark = pytest.mark.services

ORDER = EXAMPLES / "order" / "order.wasm"
FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED}


@pytest.fixture
def cli(settings):
    """Invoke the CLI with this run's database and broker prefix."""
    env = {
        "STEPFLEET_DATABASE_URL": settings.database_url,
        "STEPFLEET_AMQP_URL": settings.amqp_url,
        "STEPFLEET_PREFIX": settings.prefix,
    }
    runner = CliRunner()

    def invoke(*args: str, extra_env: dict[str, str] | None = None, stdin: str | None = None):
        return runner.invoke(app, list(args), env={**env, **(extra_env or {})}, input=stdin)

    return invoke


def test_module_push_prints_the_digest_and_is_idempotent(cli):
    """Pushing a module prints its sha256 digest; pushing the same bytes again changes nothing."""
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    first = cli("module", "push", str(ORDER), "--tenant", tenant)
    second = cli("module", "push", str(ORDER), "--tenant", tenant)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == digest_of(ORDER.read_bytes())
    assert second.exit_code == 0
    assert second.stdout.strip() == first.stdout.strip()
    listed = cli("module", "list", "--tenant", tenant)
    assert listed.stdout.count("sha256:") == 1


def test_module_push_refuses_what_is_not_a_guest_module(cli, tmp_path):
    """Garbage and modules without the ABI's exports are refused with a clear message."""
    garbage = tmp_path / "notes.wasm"
    garbage.write_text("not webassembly")
    result = cli("module", "push", str(garbage), "--tenant", "acme")
    assert result.exit_code == 1
    assert "not a valid WebAssembly module" in result.output
    empty = tmp_path / "empty.wasm"
    empty.write_bytes(b"\x00asm\x01\x00\x00\x00")
    result = cli("module", "push", str(empty), "--tenant", "acme")
    assert result.exit_code == 1
    assert "does not export its memory" in result.output


# Limits far below the defaults, so that a bomb of 40,000 small functions (800 KB) trips them
# within a second or two; the example modules pass them all.
SMALL_LIMITS = {
    "STEPFLEET_MODULE_FUNCTIONS": "1000",
    "STEPFLEET_COMPILE_TIMEOUT_SECONDS": "1",
    "STEPFLEET_COMPILE_MEMORY_BYTES": str(128 * 1024 * 1024),
}


@pytest.mark.parametrize(
    ("raised", "setting"),
    [
        ({}, "STEPFLEET_MODULE_FUNCTIONS"),
        # Memory raised too: with both small, which one a compile reaches first is a race.
        (
            {
                "STEPFLEET_MODULE_FUNCTIONS": "100000",
                "STEPFLEET_COMPILE_MEMORY_BYTES": str(1024 * 1024 * 1024),
            },
            "STEPFLEET_COMPILE_TIMEOUT_SECONDS",
        ),
        (
            {"STEPFLEET_MODULE_FUNCTIONS": "100000", "STEPFLEET_COMPILE_TIMEOUT_SECONDS": "60"},
            "STEPFLEET_COMPILE_MEMORY_BYTES",
        ),
    ],
    ids=["functions", "compile-time", "compile-memory"],
)
def test_module_push_refuses_a_compile_bomb_naming_the_limit(cli, tmp_path, raised, setting):
    """A small module that is costly to compile is refused at push with the limit it breached,
    and nothing is stored; a real module still pushes under the same limits."""
    tenant = f"bomb-{uuid.uuid4().hex[:8]}"
    bomb = tmp_path / "bomb.wasm"
    bomb.write_bytes(guest(40_000, CALLS_BODY, tag=tenant))
    limits = {**SMALL_LIMITS, **raised}
    refused = cli("module", "push", str(bomb), "--tenant", tenant, extra_env=limits)
    assert refused.exit_code == 1, refused.output
    assert f"{bomb} refused" in refused.output
    assert setting in refused.output
    assert cli("module", "list", "--tenant", tenant).stdout.count("sha256:") == 0
    pushed = cli("module", "push", str(ORDER), "--tenant", tenant, extra_env=limits)
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.strip() == digest_of(ORDER.read_bytes())


def test_module_push_leaves_the_artifact_for_a_worker_on_the_host(cli, tmp_path):
    """With the module cache directory present (a worker runs here), push seals the artifact it
    compiled there: a worker sandbox over that directory then loads it without compiling."""
    directory = tmp_path / "modules"
    CompiledModuleCache(directory)
    wasm = guest(tag=uuid.uuid4().hex)
    module = tmp_path / "tiny.wasm"
    module.write_bytes(wasm)
    env = {"STEPFLEET_MODULE_CACHE_DIR": str(directory)}
    pushed = cli("module", "push", str(module), "--tenant", "acme", extra_env=env)
    assert pushed.exit_code == 0, pushed.output
    assert len(list(directory.glob("*.cwasm"))) == 1
    digest = digest_of(wasm)
    worker = WasmSandbox(module_cache=CompiledModuleCache(directory))
    try:
        worker.load(digest, wasm, worker.compiler.artifact(digest, wasm))
        assert (worker.compiler.stats.from_disk, worker.compiler.stats.compiled) == (1, 0)
    finally:
        worker.close()


async def test_create_then_status_shows_output_and_journal(cli, store, start_worker):
    """`create` publishes, a worker runs it, and `status --json` shows output and journal."""
    # The CLI runs its own event loop, so from this async test it runs in a thread.
    digest = (
        await asyncio.to_thread(cli, "module", "push", str(ORDER), "--tenant", "acme")
    ).stdout.strip()
    await start_worker()
    instance_id = f"cli-{uuid.uuid4().hex[:10]}"
    created = await asyncio.to_thread(
        cli,
        "create",
        "--tenant",
        "acme",
        "--module",
        digest,
        "--params",
        json.dumps(ORDER_PARAMS),
        "--id",
        instance_id,
    )
    assert created.exit_code == 0, created.output
    assert created.stdout.strip() == instance_id
    await wait_for_status(store, InstanceKey("acme", instance_id), {InstanceStatus.COMPLETE})
    shown = json.loads((await asyncio.to_thread(cli, "status", instance_id, "--json")).stdout)
    assert shown["status"] == "complete"
    assert shown["output"] == ORDER_OUTPUT
    assert [(e["seq"], e["name"], e["attempt"]) for e in shown["journal"]] == [
        (0, "reserve", 1),
        (1, "charge", 1),
        (2, "ship", 1),
    ]
    human = await asyncio.to_thread(cli, "status", instance_id)
    assert "complete" in human.stdout
    assert "charge" in human.stdout


def test_cli_errors_are_one_clear_line(cli):
    """Bad input and unknown ids fail with a message, not a traceback."""
    assert (
        "is not JSON"
        in cli(
            "create", "--tenant", "acme", "--module", "sha256:" + "a" * 64, "--params", "{"
        ).output
    )
    assert "is not a digest" in cli("create", "--tenant", "acme", "--module", "abc").output
    missing = cli("status", "no-such-instance")
    assert missing.exit_code == 1
    assert "no instance 'no-such-instance'" in missing.output


async def test_operator_commands_drive_an_instance(cli, store, start_worker, playbook_wasm):
    """event, pause, resume, list, restart and delete, as an operator types them."""
    tenant = f"ops-{uuid.uuid4().hex[:8]}"
    playbook = EXAMPLES / "playbook" / "playbook.wasm"
    digest = (
        await asyncio.to_thread(cli, "module", "push", str(playbook), "--tenant", tenant)
    ).stdout.strip()
    await start_worker()
    instance_id = f"ops-{uuid.uuid4().hex[:10]}"
    ops = [
        {"op": "do", "name": "secret", "sensitive": True},
        {"op": "wait", "name": "w", "type": "go", "timeout_ms": 60_000},
    ]
    await asyncio.to_thread(
        cli, "create", "--tenant", tenant, "--module", digest,
        "--params", json.dumps({"ops": ops}), "--id", instance_id,
    )  # fmt: skip
    key = InstanceKey(tenant, instance_id)
    await wait_for_status(store, key, {InstanceStatus.WAITING})

    async def run(*args: str):
        result = await asyncio.to_thread(cli, *args)
        assert result.exit_code == 0, result.output
        return result.stdout

    shown = json.loads(await run("status", instance_id, "--json"))
    assert shown["status"] == "waiting"
    assert shown["waiting"]["event_type"] == "go"
    assert shown["journal"][0]["value"] == "<redacted>"
    assert "<redacted>" in await run("status", instance_id)
    listed = await run("list", "--tenant", tenant, "--status", "waiting")
    assert instance_id in listed

    assert "paused" in await run("pause", instance_id)
    await run("event", instance_id, "--tenant", tenant, "--type", "go", "--payload", '{"n":1}')

    async def event_stored() -> bool:
        detail = await store.detail(key)
        return detail is not None and detail.pending_events == 1

    await wait_until(event_stored, "the event for the paused instance being stored")
    assert json.loads(await run("status", instance_id, "--json"))["status"] == "paused"
    await run("resume", instance_id)
    await wait_for_status(store, key, {InstanceStatus.COMPLETE})

    resumed = await asyncio.to_thread(cli, "resume", instance_id)
    assert resumed.exit_code == 1
    assert "is complete, not paused" in resumed.output
    assert "restarted at journal position 1" in await run(
        "restart", instance_id, "--from-step", "w"
    )
    # The event the removed wait had taken is delivered to the wait again.
    await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    again = json.loads(await run("status", instance_id, "--json"))
    assert (again["generation"], again["output"]["w"]) == (1, {"n": 1})
    refused = await asyncio.to_thread(cli, "terminate", instance_id)
    assert refused.exit_code == 1
    assert "is complete and cannot be terminated" in refused.output
    assert "deleted" in await run("delete", instance_id)
    gone = await asyncio.to_thread(cli, "status", instance_id)
    assert gone.exit_code == 1


async def test_a_tenant_module_size_limit_applies_at_push(cli, store):
    """A tenant's own module_bytes limit refuses a larger module at push."""
    tenant = f"small-{uuid.uuid4().hex[:8]}"
    await store.tenants.add(tenant, None, TenantLimits(module_bytes=1024))
    refused = await asyncio.to_thread(cli, "module", "push", str(ORDER), "--tenant", tenant)
    assert refused.exit_code == 1
    assert "the limit is 1024" in refused.output


def sized_guest(pages: int, table: int = 0) -> bytes:
    """A guest that completes at once, with `pages` of memory and `table` table elements."""
    import wasmtime

    return wasmtime.wat2wasm(
        f"""
        (module
          (import "stepfleet" "complete" (func $complete (param i32 i32 i32)))
          (memory (export "memory") {pages})
          (table {table} funcref)
          (func (export "sf_abi_version") (result i32) i32.const 2)
          (func (export "sf_alloc") (param i32) (result i32) i32.const 1024)
          (func (export "sf_run") (param i32 i32) i32.const 0 i32.const 16 i32.const 2
            call $complete)
          (data (i32.const 16) "{{}}"))
        """
    )


async def test_push_refuses_a_module_that_can_never_start_within_the_limits(cli, store, tmp_path):
    """A memory minimum over the tenant's memory limit (or the fleet's), or tables over the
    run's table limit, is refused at push with the limit named; the same module fits a
    tenant whose limit is larger."""
    small = f"tiny-{uuid.uuid4().hex[:8]}"
    await store.tenants.add(small, None, TenantLimits(memory_bytes=2 * 65536))
    other = f"roomy-{uuid.uuid4().hex[:8]}"
    cases = {
        "huge.wasm": (sized_guest(60_000), "memory minimum size of 60000 pages"),
        "tables.wasm": (sized_guest(1, table=200_000), "table minimum size of 200000 elements"),
    }
    for name, (wasm, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(wasm)
        refused = await asyncio.to_thread(cli, "module", "push", str(path), "--tenant", other)
        assert refused.exit_code == 1, refused.output
        assert "can never start" in refused.output
        assert expected in refused.output
    three = tmp_path / "three.wasm"
    three.write_bytes(sized_guest(3))
    refused = await asyncio.to_thread(cli, "module", "push", str(three), "--tenant", small)
    assert refused.exit_code == 1
    assert "131072 bytes = 2 pages of memory" in refused.output
    assert await store.tenant_modules(small) == []
    fits = await asyncio.to_thread(cli, "module", "push", str(three), "--tenant", other)
    assert fits.exit_code == 0, fits.output


HOSTILE = "\x1b]52;c;c3RlcGZsZWV0\x07\x1b[2J\x9b31m\u202eboom\r\x7f"
"""Text a tenant chooses that a terminal would act on: an OSC clipboard write, a screen
clear, a C1 CSI, a bidi override, a carriage return and DEL."""


def assert_inert(text: str) -> None:
    for char in "\x1b\x07\x9b\u202e\r\x7f":
        assert char not in text, repr(char)


async def test_tenant_text_reaches_the_terminal_escaped(
    cli, topology, broker, store, start_worker, playbook
):
    """An instance's error and a dead letter's headers hold escape sequences: the
    human-readable outputs show them escaped, on their own lines, and --json keeps them
    exactly."""
    await start_worker()
    key = await playbook({"op": "fail", "message": HOSTILE + "\nstatus    complete"})
    await wait_for_status(store, key, {InstanceStatus.ERRORED})
    status = await asyncio.to_thread(cli, "status", key.instance_id, "--tenant", key.tenant)
    assert status.exit_code == 0, status.output
    assert_inert(status.stdout)
    assert "\\x1b]52;c;c3RlcGZsZWV0\\x07" in status.stdout
    assert "\\u202eboom\\r\\x7f\\nstatus    complete" in status.stdout
    assert not any(line.startswith("status    complete") for line in status.stdout.splitlines())
    as_json = await asyncio.to_thread(
        cli, "status", key.instance_id, "--tenant", key.tenant, "--json"
    )
    assert_inert(as_json.stdout)
    assert HOSTILE in json.loads(as_json.stdout)["error"]

    tenant = f"esc{uuid.uuid4().hex[:8]}"
    headers = {
        "x-tenant": tenant,
        "x-instance-id": HOSTILE,
        "x-kind": "create",
        "x-schema-version": "1",
        "x-module": "sha256:" + "a" * 64,
    }
    await broker.publish_many(
        [Outgoing(topology.ingress_exchange, f"{tenant}.create", b"{}", headers)]
    )
    [letter] = await archived_for(store, tenant, 1)
    assert letter.reason == "bad-header"
    listed = await asyncio.to_thread(cli, "dlq", "list", "--tenant", tenant)
    assert_inert(listed.stdout)
    assert "\\x1b]52;c;" in listed.stdout
    listed_json = await asyncio.to_thread(cli, "dlq", "list", "--tenant", tenant, "--json")
    assert_inert(listed_json.stdout)
    assert json.loads(listed_json.stdout)["instance"] == HOSTILE
    shown = await asyncio.to_thread(cli, "dlq", "show", str(letter.id))
    assert_inert(shown.stdout)
    assert json.loads(shown.stdout)["headers"]["x-instance-id"] == HOSTILE


async def test_status_agrees_on_compensations_and_names_held_events(
    cli, store, start_worker, playbook_wasm
):
    """An errored instance whose rollbacks all ran is not `compensating` in either view; an
    id not created yet is unknown to status, which names the events held for it."""
    tenant = f"comp-{uuid.uuid4().hex[:8]}"
    playbook = EXAMPLES / "playbook" / "playbook.wasm"
    digest = (
        await asyncio.to_thread(cli, "module", "push", str(playbook), "--tenant", tenant)
    ).stdout.strip()
    await start_worker()
    instance_id = f"comp-{uuid.uuid4().hex[:8]}"
    ops = [
        {"op": "do", "name": "a", "rollback": True},
        {"op": "fail", "message": "out of luck"},
    ]
    await asyncio.to_thread(
        cli, "create", "--tenant", tenant, "--module", digest,
        "--params", json.dumps({"ops": ops}), "--id", instance_id,
    )  # fmt: skip
    record, _ = await wait_for_status(store, InstanceKey(tenant, instance_id), FINAL)
    assert record.status is InstanceStatus.ERRORED
    shown = json.loads((await asyncio.to_thread(cli, "status", instance_id, "--json")).stdout)
    assert shown["compensating"] is False
    assert "compensated" in [e["kind"] for e in shown["journal"]]
    assert (
        "running compensations" not in (await asyncio.to_thread(cli, "status", instance_id)).stdout
    )

    later = f"later-{uuid.uuid4().hex[:8]}"
    sent = await asyncio.to_thread(cli, "event", later, "--tenant", tenant, "--type", "go")
    assert sent.exit_code == 0, sent.output

    async def held() -> bool:
        return bool(await store.held_events(InstanceKey(tenant, later)))

    await wait_until(held, "the event to be held for its create")
    unknown = await asyncio.to_thread(cli, "status", later, "--tenant", tenant)
    assert unknown.exit_code == 1
    assert "not created yet: 1 event(s) for it held until" in unknown.output


async def test_tenant_add_push_and_secrets_are_audited_without_passwords_or_values(
    cli, store, settings, topology
):
    """The CLI's tenant add, module push and secret commands share the API's code: each
    writes its audit entry under the operator's name, never with a password or a value."""
    from stepfleet.broker.admin import BrokerAdmin
    from stepfleet.egress import new_key

    name = f"cli{uuid.uuid4().hex[:8]}"
    operator = {"STEPFLEET_OPERATOR": f"ada-{name}"}
    added = await asyncio.to_thread(
        cli, "tenant", "add", name, "--limits", '{"running_steps":2}', extra_env=operator
    )
    try:
        assert added.exit_code == 0, added.output
        assert f"tenant {name} created" in added.output
        password = next(
            line.split()[-1] for line in added.output.splitlines() if "password" in line.split()
        )
        pushed = await asyncio.to_thread(
            cli, "module", "push", str(ORDER), "--tenant", name, extra_env=operator
        )
        assert pushed.exit_code == 0, pushed.output
        value = "Bearer cli-" + uuid.uuid4().hex
        env = {**operator, "STEPFLEET_SECRET_KEY": new_key()}
        stored = await asyncio.to_thread(
            cli,
            "secret",
            "set",
            name,
            "api",
            "--host",
            "api.example.com",
            "--header",
            "Authorization",
            extra_env=env,
            stdin=value + "\n",
        )
        assert stored.exit_code == 0, stored.output
        assert "not on" in stored.output  # the host is not allowed yet
        listed = await asyncio.to_thread(cli, "secret", "list", name)
        assert "api.example.com" in listed.output
        assert value not in listed.output + stored.output
        deleted = await asyncio.to_thread(cli, "secret", "delete", name, "api", extra_env=env)
        assert deleted.exit_code == 0, deleted.output
        gone = await asyncio.to_thread(cli, "secret", "delete", name, "api", extra_env=env)
        assert gone.exit_code == 1

        entries = [
            e
            for e in await store.dead_letters.audit_entries(limit=500)
            if e.actor == operator["STEPFLEET_OPERATOR"]
        ]
        assert sorted(e.action for e in entries) == [
            "module-push",
            "secret-delete",
            "secret-set",
            "tenant-add",
        ]
        for entry in entries:
            assert password not in entry.detail
            assert value not in entry.detail
    finally:
        await BrokerAdmin(settings.rabbitmq_admin_url, topology).delete_producer(
            f"{settings.prefix}.tenant.{name}"
        )
