"""The HTTP API's tenant routes through an ASGI client against the real PostgreSQL and
RabbitMQ: adding tenants with producer users, pushing, pausing, resuming and moving modules,
and secrets; every role, tenant scoping, bad input, and no password or secret value in any
answer, audit entry or log line."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from stepfleet.api import ApiSettings, create_app
from stepfleet.broker.admin import BrokerAdmin
from stepfleet.egress import new_key, open_secret
from stepfleet.schemas import InstanceStatus, TenantLimits, digest_of
from stepfleet.store import PgStore
from tests.conftest import capture_logs
from tests.integration.test_api import Tokens, bearer, error_of, issue_tokens
from tests.integration.test_module_moves import with_custom_section
from tests.integration.test_primitives import WEEK_MS, bring_timer_forward, finished, reached

pytestmark = pytest.mark.services

SECRET_VALUE = "Bearer tok-" + "9f3a" * 8


@pytest.fixture(scope="module")
async def tokens(store: PgStore) -> Tokens:
    run = uuid.uuid4().hex[:8]
    tenant_a, tenant_b = f"tena{run}", f"tenb{run}"
    for tenant in (tenant_a, tenant_b):
        await store.tenants.add(tenant, None, TenantLimits())
    return await issue_tokens(store, "t-{label}-" + run, tenant_a, tenant_b)


@pytest.fixture(scope="module")
def sealing() -> str:
    return new_key()


@pytest.fixture(scope="module")
async def client(settings, sealing) -> AsyncIterator[httpx.AsyncClient]:
    with_key = settings.model_copy(update={"secret_key": SecretStr(sealing)})
    app = create_app(with_key, ApiSettings(max_body_bytes=4096, max_module_bytes=256 * 1024))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as c:
        yield c
    await app.state.fleet.close()


@pytest.fixture
async def producers(settings, topology) -> AsyncIterator[list[str]]:
    """Names of producer users a test made; deleted afterwards."""
    users: list[str] = []
    yield users
    admin = BrokerAdmin(settings.rabbitmq_admin_url, topology)
    for user in users:
        await admin.delete_producer(user)


async def audit(store: PgStore, action: str, actor: str) -> list[Any]:
    return [
        e
        for e in await store.dead_letters.audit_entries(action=action, limit=500)
        if e.actor == actor
    ]


async def test_a_fleet_admin_adds_a_tenant_with_its_producer_user(
    client, tokens, store, settings, producers
):
    name = f"new{uuid.uuid4().hex[:8]}"
    request = {"name": name, "limits": {"running_steps": 3}}
    for weaker in (tokens.viewer, tokens.operator, tokens.a_admin):
        error_of(await client.post("/api/v1/tenants", json=request, headers=bearer(weaker)), 403)
    admin = bearer(tokens.admin)
    with capture_logs() as logs:
        made = await client.post("/api/v1/tenants", json=request, headers=admin)
    assert made.status_code == 201, made.text
    body = made.json()
    producers.append(body["producer"]["user"])
    password = body["producer"]["password"]
    assert body["created"] is True
    assert body["limits"] == {"running_steps": 3}
    assert body["producer"]["user"] == body["broker_user"] == f"{settings.prefix}.tenant.{name}"
    assert body["producer"]["routing_keys"] == [f"{name}.create", f"{name}.event"]
    assert len(password) >= 24
    # The password works: RabbitMQ takes it.
    connection = await aiormq.connect(f"amqp://{body['producer']['user']}:{password}@127.0.0.1/")
    await connection.close()

    shown = await client.get(f"/api/v1/tenants/{name}", headers=bearer(tokens.viewer))
    assert shown.json()["broker_user"] == body["broker_user"]
    assert password not in shown.text
    again = await client.post("/api/v1/tenants", json=request, headers=admin)
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    assert again.json()["producer"]["password"] != password

    entries = await audit(store, "tenant-add", tokens.names["admin"])
    assert [e.target for e in entries] == [name]
    resets = await audit(store, "tenant-reset-producer", tokens.names["admin"])
    assert [e.target for e in resets] == [name]
    for entry in [*entries, *resets]:
        assert password not in entry.detail
        assert again.json()["producer"]["password"] not in entry.detail
    assert password not in repr(logs)

    # Without a producer user; then asking for one is refused, as the CLI refuses it.
    bare = f"bare{uuid.uuid4().hex[:8]}"
    plain = await client.post(
        "/api/v1/tenants", json={"name": bare, "producer": False}, headers=admin
    )
    assert plain.status_code == 201, plain.text
    assert plain.json()["producer"] is None
    assert plain.json()["broker_user"] is None
    refused = await client.post("/api/v1/tenants", json={"name": bare}, headers=admin)
    assert "nothing was changed" in error_of(refused, 409)["message"]

    for bad in (
        {"name": "Not A Name"},
        {"name": "ok", "limits": {"running_steps": -1}},
        {"name": "ok", "bogus": 1},
        {},
    ):
        error_of(await client.post("/api/v1/tenants", json=bad, headers=admin), 422)


async def test_modules_are_listed_and_pushed_with_the_cli_checks(
    client, tokens, store, order_wasm, greeter_wasm
):
    name = tokens.tenant_a
    path = f"/api/v1/tenants/{name}/modules"
    wasm = {"content-type": "application/wasm"}
    admin = {**bearer(tokens.admin), **wasm}
    for weaker in (tokens.viewer, tokens.operator, tokens.a_admin):
        error_of(
            await client.post(path, content=order_wasm, headers={**bearer(weaker), **wasm}), 403
        )
    pushed = await client.post(path, content=order_wasm, headers=admin)
    assert pushed.status_code == 201, pushed.text
    assert pushed.json() == {
        "tenant": name,
        "digest": digest_of(order_wasm),
        "size_bytes": len(order_wasm),
        "new": True,
    }
    again = await client.post(path, content=order_wasm, headers=admin)
    assert again.status_code == 200
    assert again.json()["new"] is False

    listed = await client.get(path, headers=bearer(tokens.a_viewer))
    assert [m["digest"] for m in listed.json()] == [digest_of(order_wasm)]
    assert listed.json()[0]["size_bytes"] == len(order_wasm)
    error_of(
        await client.get(
            f"/api/v1/tenants/{tokens.tenant_b}/modules", headers=bearer(tokens.a_viewer)
        ),
        404,
    )
    error_of(await client.get("/api/v1/tenants/nobody-here/modules", headers=admin), 404)
    error_of(await client.get("/api/v1/tenants/Bad Name/modules", headers=admin), 422)
    error_of(
        await client.post("/api/v1/tenants/nobody-here/modules", content=order_wasm, headers=admin),
        404,
    )

    # Bad bodies: not wasm, empty, garbage, a module without the ABI, over the limits.
    as_json = {**bearer(tokens.admin), "content-type": "application/json"}
    assert error_of(await client.post(path, json={"x": 1}, headers=as_json), 415)["error"] == (
        "unsupported-media-type"
    )
    error_of(await client.post(path, content=b"", headers=admin), 422)
    garbage = error_of(await client.post(path, content=b"not webassembly", headers=admin), 422)
    assert garbage["message"].startswith("module refused")
    # The smallest valid module: no exports.
    empty_module = b"\x00asm\x01\x00\x00\x00"
    assert (
        "refused"
        in error_of(await client.post(path, content=empty_module, headers=admin), 422)["message"]
    )
    huge = b"\x00asm\x01\x00\x00\x00" + b"\x00" * (256 * 1024)
    error_of(await client.post(path, content=huge, headers=admin), 413)
    await store.tenants.set_limits(tokens.tenant_b, TenantLimits(module_bytes=1024))
    small = await client.post(
        f"/api/v1/tenants/{tokens.tenant_b}/modules", content=greeter_wasm, headers=admin
    )
    assert "the limit is 1024" in error_of(small, 413)["message"]
    await store.tenants.set_limits(tokens.tenant_b, TenantLimits())
    assert digest_of(greeter_wasm) not in [
        d for d, _, _ in await store.tenant_modules(tokens.tenant_b)
    ]

    entries = await audit(store, "module-push", tokens.names["admin"])
    assert [e.target for e in entries] == [name, name]
    assert digest_of(order_wasm) in entries[0].detail


async def test_an_operator_pauses_resumes_and_moves_a_module(
    client, tokens, store, start_worker, playbook, playbook_wasm, greeter_wasm
):
    await start_worker()
    name = tokens.tenant_a
    keys = [
        await playbook(
            {"op": "sleep", "name": "week", "ms": WEEK_MS}, {"op": "do", "name": "a"}, tenant=name
        )
        for _ in range(2)
    ]
    for key in keys:
        await reached(store, key, InstanceStatus.SLEEPING)
    old = digest_of(playbook_wasm)
    operator = bearer(tokens.a_operator)
    base = f"/api/v1/tenants/{name}/modules"

    # Pause and resume every instance of the module.
    for weaker in (tokens.viewer, tokens.a_viewer):
        error_of(await client.post(f"{base}/{old}/pause", headers=bearer(weaker)), 403)
    error_of(
        await client.post(
            f"/api/v1/tenants/{tokens.tenant_b}/modules/{old}/pause", headers=operator
        ),
        404,
    )
    error_of(await client.post(f"{base}/sha256:nothex/pause", headers=operator), 422)
    paused = await client.post(f"{base}/{old}/pause", headers=operator)
    assert paused.status_code == 200, paused.text
    assert set(paused.json()["instances"]) == {k.instance_id for k in keys}
    for key in keys:
        await reached(store, key, InstanceStatus.PAUSED)
    resumed = await client.post(f"{base}/{old}/resume", headers=bearer(tokens.operator))
    assert set(resumed.json()["instances"]) == {k.instance_id for k in keys}
    for key in keys:
        await reached(store, key, InstanceStatus.SLEEPING)
    pauses = await audit(store, "pause", tokens.names["a_operator"])
    assert {e.target for e in pauses} == {f"{k.tenant}/{k.instance_id}" for k in keys}

    # Moves: the greeter does not follow a sleeper's journal; the same program does.
    same = with_custom_section(playbook_wasm, b"api")
    await store.put_module(name, digest_of(same), same)
    await store.put_module(name, digest_of(greeter_wasm), greeter_wasm)
    moves = f"{base}/moves"
    bad_move = {"from": old, "to": digest_of(greeter_wasm), "dry_run": True}
    error_of(await client.post(moves, json=bad_move, headers=bearer(tokens.viewer)), 403)
    error_of(
        await client.post(
            f"/api/v1/tenants/{tokens.tenant_b}/modules/moves", json=bad_move, headers=operator
        ),
        404,
    )
    dry = await client.post(moves, json=bad_move, headers=operator)
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True
    assert dry.json()["checked"] == 2
    assert dry.json()["not_compatible"] == 2
    assert {i["verdict"] for i in dry.json()["items"]} == {"nondeterministic"}
    assert all(i["detail"].startswith("nondeterminism") for i in dry.json()["items"])
    refused = await client.post(moves, json={**bad_move, "dry_run": False}, headers=operator)
    assert refused.json()["moved"] == 0

    good = {"from": old, "to": digest_of(same), "dry_run": True}
    dry = await client.post(moves, json=good, headers=operator)
    assert {i["verdict"] for i in dry.json()["items"]} == {"compatible"}
    assert not any(i["moved"] for i in dry.json()["items"])
    for key in keys:  # a dry run changes nothing
        detail = await store.detail(key)
        assert detail is not None
        assert detail.record.module == old
    assert await audit(store, "module-move", tokens.names["a_operator"]) == []

    moved = await client.post(moves, json={**good, "dry_run": False}, headers=operator)
    assert moved.json()["moved"] == 2, moved.text
    assert {i["id"] for i in moved.json()["items"] if i["moved"]} == {k.instance_id for k in keys}
    entries = await audit(store, "module-move", tokens.names["a_operator"])
    assert {e.target for e in entries} == {f"{k.tenant}/{k.instance_id}" for k in keys}
    for key in keys:
        await bring_timer_forward(store, key)
        detail = await finished(store, key)
        assert detail.record.status is InstanceStatus.COMPLETE
        assert detail.record.module == digest_of(same)

    never = {"to": "sha256:" + "0" * 64}
    assert (
        "never pushed"
        in error_of(await client.post(moves, json=never, headers=operator), 409)["message"]
    )
    for bad in ({"to": "nope"}, {"to": digest_of(same), "extra": 1}, {"from": old}):
        error_of(await client.post(moves, json=bad, headers=operator), 422)


async def test_secrets_are_set_listed_and_deleted_and_their_values_never_shown(
    client, tokens, store, settings, sealing
):
    name = tokens.tenant_a
    path = f"/api/v1/tenants/{name}/secrets/api-key"
    body = {"host": "API.example.com", "header": "Authorization", "value": SECRET_VALUE}
    for weaker in (tokens.viewer, tokens.operator, tokens.a_admin):
        error_of(await client.put(path, json=body, headers=bearer(weaker)), 403)
    admin = bearer(tokens.admin)
    with capture_logs() as logs:
        stored = await client.put(path, json=body, headers=admin)
        assert stored.status_code == 200, stored.text
        assert stored.json() == {
            "tenant": name,
            "name": "api-key",
            "host": "api.example.com",
            "header": "Authorization",
            "host_allowed": False,
        }
        listed = await client.get(
            f"/api/v1/tenants/{name}/secrets", headers=bearer(tokens.a_viewer)
        )
        assert listed.json() == [
            {
                "tenant": name,
                "name": "api-key",
                "host": "api.example.com",
                "header": "Authorization",
            }
        ]
        error_of(
            await client.get(
                f"/api/v1/tenants/{tokens.tenant_b}/secrets", headers=bearer(tokens.a_viewer)
            ),
            404,
        )
        # Refusals say why without the value.
        for bad, status in (
            ({**body, "header": "Host"}, 422),
            ({**body, "value": SECRET_VALUE + "\r\nX-Evil: 1"}, 422),
            ({**body, "host": "http://x/y"}, 422),
            ({**body, "value": ""}, 422),
            ({**body, "extra": SECRET_VALUE}, 422),
        ):
            answer = await client.put(path, json=bad, headers=admin)
            error_of(answer, status)
            assert SECRET_VALUE not in answer.text
        error_of(
            await client.put(f"/api/v1/tenants/{name}/secrets/bad name", json=body, headers=admin),
            422,
        )
        error_of(
            await client.put("/api/v1/tenants/nobody-here/secrets/k", json=body, headers=admin), 404
        )
        for answer in (stored, listed):
            assert SECRET_VALUE not in answer.text

        audited = await client.get("/api/v1/audit", params={"limit": 500}, headers=admin)
        assert SECRET_VALUE not in audited.text
        entries = await audit(store, "secret-set", tokens.names["admin"])
        assert [e.target for e in entries] == [f"{name}/api-key"]

        deleted = await client.delete(path, headers=admin)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["name"] == "api-key"
        error_of(await client.delete(path, headers=admin), 404)
        error_of(await client.delete(path, headers=bearer(tokens.operator)), 403)
    assert SECRET_VALUE not in repr(logs)
    assert [e.target for e in await audit(store, "secret-delete", tokens.names["admin"])] == [
        f"{name}/api-key"
    ]

    # Sealed at rest: the ciphertext opens to the value with the fleet's key.
    await client.put(path, json=body, headers=admin)
    [secret] = [s for s in await store.tenants.secrets() if s.tenant == name]
    assert SECRET_VALUE.encode() not in secret.ciphertext
    assert open_secret(sealing, secret) == SECRET_VALUE
    engine = create_async_engine(settings.database_url)
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT detail FROM audit_log"))).all()
    await engine.dispose()
    assert not any(SECRET_VALUE in (row.detail or "") for row in rows)


async def test_secrets_need_the_sealing_key(settings, tokens):
    app = create_app(settings, ApiSettings())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test"
    ) as c:
        answer = await c.put(
            f"/api/v1/tenants/{tokens.tenant_a}/secrets/k",
            json={"host": "api.example.com", "header": "Authorization", "value": SECRET_VALUE},
            headers=bearer(tokens.admin),
        )
        assert "STEPFLEET_SECRET_KEY" in error_of(answer, 503)["message"]
    await app.state.fleet.close()


async def test_every_tenant_route_needs_a_token(client, tokens):
    digest = "sha256:" + "a" * 64
    base = f"/api/v1/tenants/{tokens.tenant_a}"
    for method, path in (
        ("POST", "/api/v1/tenants"),
        ("GET", f"{base}/modules"),
        ("POST", f"{base}/modules"),
        ("POST", f"{base}/modules/{digest}/pause"),
        ("POST", f"{base}/modules/{digest}/resume"),
        ("POST", f"{base}/modules/moves"),
        ("GET", f"{base}/secrets"),
        ("PUT", f"{base}/secrets/k"),
        ("DELETE", f"{base}/secrets/k"),
    ):
        for headers in ({}, bearer("sft_wrong")):
            answer = await client.request(method, path, headers=headers)
            assert error_of(answer, 401)["error"] == "unauthorized", (method, path)


async def test_a_push_without_a_length_is_counted_against_the_limit(client, tokens):
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"\x00" * 8192

    answer = await client.post(
        f"/api/v1/tenants/{tokens.tenant_a}/modules",
        content=chunks(),
        headers={**bearer(tokens.admin), "content-type": "application/wasm"},
    )
    error_of(answer, 413)
