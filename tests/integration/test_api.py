"""The HTTP API through an ASGI client against the real PostgreSQL and RabbitMQ: every
endpoint, every role, tenant scoping, bad input answered with clean JSON errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from stepfleet.api import ApiSettings, create_app
from stepfleet.api.tokens import issue_token
from stepfleet.schemas import InstanceKey, InstanceStatus, TenantLimits, digest_of
from stepfleet.store import LetterFilter, PgStore
from tests.conftest import ORDER_PARAMS
from tests.integration.conftest import wait_for_status, wait_until
from tests.integration.test_dead_letters import create_message
from tests.integration.test_fleet import dead_letter_of
from tests.integration.test_primitives import finished, reached

pytestmark = pytest.mark.services

WEEK_MS = 7 * 86400 * 1000


@dataclass
class Tokens:
    """A secret per role: fleet-wide ones, and ones scoped to tenant `a`."""

    admin: str
    operator: str
    viewer: str
    a_operator: str
    a_viewer: str
    a_admin: str
    tenant_a: str
    tenant_b: str
    names: dict[str, str]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def issue_tokens(store: PgStore, named: str, tenant_a: str, tenant_b: str) -> Tokens:
    """A token per role, fleet-wide and scoped to `tenant_a`; `named` makes each name from
    its label (`{label}` in it)."""
    made: dict[str, str] = {}
    names: dict[str, str] = {}
    for label, role, tenant in (
        ("admin", "admin", None),
        ("operator", "operator", None),
        ("viewer", "viewer", None),
        ("a_operator", "operator", tenant_a),
        ("a_viewer", "viewer", tenant_a),
        ("a_admin", "admin", tenant_a),
    ):
        name = named.format(label=label.replace("_", "-"))
        _, made[label] = await issue_token(store, name, role, tenant, actor="tests")
        names[label] = name
    return Tokens(**made, tenant_a=tenant_a, tenant_b=tenant_b, names=names)


@pytest.fixture(scope="module")
async def tokens(store: PgStore) -> Tokens:
    run = uuid.uuid4().hex[:8]
    return await issue_tokens(store, "{label}-" + run, f"apia{run}", f"apib{run}")


@pytest.fixture(scope="module")
async def client(settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, ApiSettings(max_body_bytes=4096))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as c:
        yield c
    await app.state.fleet.close()


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is `status` with a JSON error body (never a stack trace)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error", "message"}, body
    assert "Traceback" not in response.text
    return body


async def test_probes_need_no_token(client, settings):
    """/healthz answers while the process runs; /readyz answers 200 with PostgreSQL reachable
    and 503 with the reason when it is not."""
    assert (await client.get("/healthz")).json() == {"ok": True, "reason": None}
    assert (await client.get("/readyz")).status_code == 200
    down = create_app(
        settings.model_copy(
            update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
        )
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=down), base_url="http://api.test"
    ) as c:
        answer = await c.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["ok"] is False
        assert "PostgreSQL" in answer.json()["reason"]
        assert (await c.get("/healthz")).status_code == 200
    await down.state.fleet.close()


async def test_no_token_a_wrong_token_and_a_revoked_one_are_401(client, store, tokens):
    body = error_of(await client.get("/api/v1/instances"), 401)
    assert body["error"] == "unauthorized"
    assert (await client.get("/api/v1/instances")).headers["www-authenticate"] == "Bearer"
    error_of(await client.get("/api/v1/instances", headers=bearer("sft_wrong")), 401)
    error_of(await client.get("/api/v1/instances", headers={"Authorization": "Basic eDp5"}), 401)
    _, secret = await issue_token(store, f"short-{uuid.uuid4().hex[:6]}", "viewer", None, actor="t")
    assert (await client.get("/api/v1/tenants", headers=bearer(secret))).status_code == 200
    name = (await store.tokens.all())[0].name
    listed = await client.get("/api/v1/tokens", headers=bearer(tokens.admin))
    assert name in [t["name"] for t in listed.json()]
    assert "secret" not in listed.text
    assert secret not in listed.text
    short = next(t["name"] for t in listed.json() if t["name"].startswith("short-"))
    revoked = await client.delete(f"/api/v1/tokens/{short}", headers=bearer(tokens.admin))
    assert revoked.json()["revoked_at"] is not None
    error_of(await client.get("/api/v1/tenants", headers=bearer(secret)), 401)
    error_of(await client.delete(f"/api/v1/tokens/{short}", headers=bearer(tokens.admin)), 404)


async def test_tokens_are_managed_by_a_fleet_admin_only(client, store, tokens):
    name = f"made-{uuid.uuid4().hex[:6]}"
    request = {"name": name, "role": "operator", "tenant": tokens.tenant_a}
    for weaker in (tokens.viewer, tokens.operator, tokens.a_admin):
        error_of(await client.post("/api/v1/tokens", json=request, headers=bearer(weaker)), 403)
        error_of(await client.get("/api/v1/tokens", headers=bearer(weaker)), 403)
    made = await client.post("/api/v1/tokens", json=request, headers=bearer(tokens.admin))
    assert made.status_code == 201, made.text
    secret = made.json()["secret"]
    assert secret.startswith("sft_")
    assert made.json()["tenant"] == tokens.tenant_a
    again = await client.post("/api/v1/tokens", json=request, headers=bearer(tokens.admin))
    assert "exists" in error_of(again, 409)["message"]
    bad = {"name": "has space", "role": "operator"}
    error_of(await client.post("/api/v1/tokens", json=bad, headers=bearer(tokens.admin)), 422)
    bad = {"name": "ok", "role": "root"}
    error_of(await client.post("/api/v1/tokens", json=bad, headers=bearer(tokens.admin)), 422)
    # The new token works at once, within its tenant.
    seen = await client.get("/api/v1/tenants", headers=bearer(secret))
    assert seen.status_code == 200
    entries = await store.dead_letters.audit_entries(action="token-add", limit=50)
    assert any(e.target == name and e.actor == tokens.names["admin"] for e in entries)


async def test_instances_list_filters_and_pages_by_cursor(
    client, tokens, store, start_worker, playbook
):
    await start_worker()
    done = [await playbook({"op": "do", "name": "a"}, tenant=tokens.tenant_a) for _ in range(3)]
    for key in done:  # before the next create: one batch's creates share a creation time
        await finished(store, key)
    asleep = await playbook({"op": "sleep", "name": "nap", "ms": WEEK_MS}, tenant=tokens.tenant_a)
    other = await playbook({"op": "do", "name": "a"}, tenant=tokens.tenant_b)
    await finished(store, other)
    await reached(store, asleep, InstanceStatus.SLEEPING)

    listed = await client.get(
        "/api/v1/instances", params={"tenant": tokens.tenant_a}, headers=bearer(tokens.viewer)
    )
    ids = [item["id"] for item in listed.json()["items"]]
    assert set(ids) == {k.instance_id for k in [*done, asleep]}
    assert ids[0] == asleep.instance_id  # newest first

    pages: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"tenant": tokens.tenant_a, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (
            await client.get("/api/v1/instances", params=params, headers=bearer(tokens.viewer))
        ).json()
        pages += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == ids

    sleeping = await client.get(
        "/api/v1/instances",
        params={"tenant": tokens.tenant_a, "status": "sleeping"},
        headers=bearer(tokens.viewer),
    )
    assert [i["id"] for i in sleeping.json()["items"]] == [asleep.instance_id]
    digest = sleeping.json()["items"][0]["module"]
    by_module = await client.get(
        "/api/v1/instances",
        params={"tenant": tokens.tenant_b, "module": digest, "since": "2000-01-01T00:00:00Z"},
        headers=bearer(tokens.viewer),
    )
    assert [i["id"] for i in by_module.json()["items"]] == [other.instance_id]
    future = await client.get(
        "/api/v1/instances",
        params={"tenant": tokens.tenant_a, "since": "2999-01-01T00:00:00Z"},
        headers=bearer(tokens.viewer),
    )
    assert future.json() == {"items": [], "next_cursor": None}

    # A tenant's token lists its own tenant whatever it asks, and another's is not there.
    scoped = await client.get("/api/v1/instances", headers=bearer(tokens.a_viewer))
    assert {i["tenant"] for i in scoped.json()["items"]} == {tokens.tenant_a}
    error_of(
        await client.get(
            "/api/v1/instances", params={"tenant": tokens.tenant_b}, headers=bearer(tokens.a_viewer)
        ),
        404,
    )


async def test_bad_filters_and_ids_are_422_and_unknown_ones_404(client, tokens):
    h = bearer(tokens.viewer)
    for params in (
        {"status": "asleep"},
        {"tenant": "Not A Tenant"},
        {"since": "yesterday"},
        {"limit": 0},
        {"limit": 100000},
        {"cursor": "!!!"},
        {"cursor": "WzFd"},  # base64 of [1]
    ):
        error_of(await client.get("/api/v1/instances", params=params, headers=h), 422)
    error_of(await client.get("/api/v1/instances/Bad Tenant/x", headers=h), 422)
    error_of(await client.get("/api/v1/instances/acme/bad%20id", headers=h), 422)
    error_of(await client.get("/api/v1/instances/acme/x/", headers=h), 404)
    error_of(await client.get(f"/api/v1/instances/{tokens.tenant_a}/nope", headers=h), 404)
    error_of(await client.get("/api/v1/dead-letters/abc", headers=h), 422)
    error_of(await client.get("/api/v1/dead-letters/0", headers=h), 422)
    error_of(await client.get("/api/v1/dead-letters/999999999", headers=h), 404)
    error_of(await client.get("/api/v1/dead-letters", params={"until": "x"}, headers=h), 422)
    error_of(await client.get("/api/v1/no-such-thing", headers=h), 404)
    error_of(await client.put("/api/v1/instances", headers=h), 405)


async def test_oversize_and_malformed_bodies_are_refused(
    client, tokens, playbook, store, start_worker
):
    await start_worker()
    key = await playbook({"op": "sleep", "name": "nap", "ms": WEEK_MS}, tenant=tokens.tenant_a)
    await reached(store, key, InstanceStatus.SLEEPING)
    url = f"/api/v1/instances/{key.tenant}/{key.instance_id}/restart"
    h = bearer(tokens.operator)
    big = json.dumps({"from_step": "x" * 10_000})
    assert error_of(await client.post(url, content=big, headers=h), 413)["error"] == "too-large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    # No Content-Length: counted while read.
    error_of(await client.post(url, content=chunks(), headers=h), 413)
    error_of(await client.post(url, content=b"{not json", headers=h), 422)
    error_of(await client.post(url, json={"from_step": "a", "extra": 1}, headers=h), 422)
    error_of(await client.post(url, json={"from_step": 5}, headers=h), 422)
    error_of(await client.post(url, json={"from_step": "none-such"}, headers=h), 409)
    # Nothing of it changed the instance.
    detail = await store.detail(key)
    assert detail is not None
    assert detail.record.status is InstanceStatus.SLEEPING


async def test_detail_shows_journal_attempts_events_and_timer(
    client, tokens, store, start_worker, playbook, settings, topology
):
    from tests.integration.test_primitives import send_event

    await start_worker()
    key = await playbook(
        {"op": "do", "name": "flaky", "fail_times": 1, "retries": {"limit": 2, "delay_ms": 1}},
        {"op": "wait", "name": "approval", "type": "approve", "timeout_ms": WEEK_MS},
        tenant=tokens.tenant_a,
    )
    await reached(store, key, InstanceStatus.WAITING)
    url = f"/api/v1/instances/{key.tenant}/{key.instance_id}"
    waiting = (await client.get(url, headers=bearer(tokens.a_viewer))).json()
    assert waiting["status"] == "waiting"
    assert waiting["timer"]["kind"] == "event"
    assert waiting["timer"]["event_type"] == "approve"
    assert waiting["timer"]["due_at"] is not None
    assert [(a["name"], a["attempt"], a["error"]) for a in waiting["failed_attempts"]] == [
        ("flaky", 1, "attempt 1 failed")
    ]
    await send_event(settings, topology, key, "approve", {"by": "ada"}, "ev-1")
    await finished(store, key)
    done = (await client.get(url, headers=bearer(tokens.a_viewer))).json()
    assert done["status"] == "complete"
    assert [(e["name"], e["kind"]) for e in done["journal"]] == [
        ("flaky", "step_succeeded"),
        ("approval", "event_received"),
    ]
    assert done["journal"][0]["attempt"] == 2
    assert done["journal"][0]["ms"] is not None
    assert done["events"] == [
        {
            "event_id": "ev-1",
            "type": "approve",
            "payload": {"by": "ada"},
            "received_at": done["events"][0]["received_at"],
            "consumed_seq": 1,
        }
    ]
    assert done["output"]["approval"] == {"by": "ada"}
    assert done["timer"] is None
    # Another tenant's token: the instance does not exist for it.
    _, b_viewer = await issue_token(
        store, f"b-viewer-{uuid.uuid4().hex[:6]}", "viewer", tokens.tenant_b, actor="t"
    )
    error_of(await client.get(url, headers=bearer(b_viewer)), 404)


async def test_operator_actions_go_through_control_and_are_audited(
    client, tokens, store, start_worker, playbook
):
    await start_worker()
    key = await playbook(
        {"op": "do", "name": "one"},
        {"op": "sleep", "name": "nap", "ms": WEEK_MS},
        tenant=tokens.tenant_a,
    )
    await reached(store, key, InstanceStatus.SLEEPING)
    base = f"/api/v1/instances/{key.tenant}/{key.instance_id}"

    # Viewers read, they do not act; another tenant's operator sees no such instance.
    for action in ("pause", "resume", "terminate", "restart", "retry"):
        error_of(await client.post(f"{base}/{action}", headers=bearer(tokens.viewer)), 403)
        error_of(await client.post(f"{base}/{action}", headers=bearer(tokens.a_viewer)), 403)
    error_of(await client.delete(base, headers=bearer(tokens.viewer)), 403)
    _, b_operator = await issue_token(
        store, f"b-op-{uuid.uuid4().hex[:6]}", "operator", tokens.tenant_b, actor="t"
    )
    error_of(await client.post(f"{base}/pause", headers=bearer(b_operator)), 404)
    error_of(await client.delete(base, headers=bearer(b_operator)), 404)

    op = bearer(tokens.a_operator)
    paused = await client.post(f"{base}/pause", headers=op)
    assert paused.json() == {
        "action": "pause",
        "tenant": key.tenant,
        "id": key.instance_id,
        "status": "paused",
        "published": True,
    }
    refused = error_of(await client.post(f"{base}/retry", headers=op), 409)
    assert "not errored" in refused["message"]
    resumed = await client.post(f"{base}/resume", headers=op)
    assert resumed.json()["status"] == "sleeping"
    error_of(await client.post(f"{base}/resume", headers=op), 409)
    error_of(await client.delete(base, headers=op), 409)  # not finished yet

    restarted = await client.post(f"{base}/restart", json={"from_step": "nap"}, headers=op)
    assert restarted.json()["status"] in ("running", "sleeping")
    await reached(store, key, InstanceStatus.SLEEPING)
    detail = await store.detail(key)
    assert detail is not None
    assert detail.record.generation == 1
    # The journal before the step named was kept; the sleep began again.
    assert [e.name for e in detail.journal] == ["one", "nap"]
    assert detail.journal[1].started_at > detail.journal[0].finished_at

    terminated = await client.post(f"{base}/terminate", json={"rollback": False}, headers=op)
    assert terminated.json()["status"] == "terminated"
    error_of(await client.post(f"{base}/pause", headers=op), 409)
    gone = await client.delete(base, headers=op)
    assert gone.json()["status"] is None
    error_of(await client.get(base, headers=op), 404)

    actions = [
        (e.actor, e.action)
        for e in await store.dead_letters.audit_entries(limit=500)
        if e.target == f"{key.tenant}/{key.instance_id}"
    ]
    who = tokens.names["a_operator"]
    assert sorted(actions) == sorted(
        [(who, "pause"), (who, "resume"), (who, "restart"), (who, "terminate"), (who, "delete")]
    )


async def test_failed_instances_are_retried_one_or_in_bulk(
    client, tokens, store, start_worker, playbook
):
    await start_worker()
    failing = {"op": "do", "name": "x", "fail_times": 1, "retries": {"limit": 0}, "propagate": True}
    first = await playbook(failing, tenant=tokens.tenant_a)
    second = await playbook(failing, tenant=tokens.tenant_a)
    for key in (first, second):
        await reached(store, key, InstanceStatus.ERRORED)
    op = bearer(tokens.operator)
    one = await client.post(
        f"/api/v1/instances/{first.tenant}/{first.instance_id}/retry", headers=op
    )
    assert one.status_code == 200, one.text
    await reached(store, first, InstanceStatus.COMPLETE)
    error_of(
        await client.post(
            f"/api/v1/instances/{first.tenant}/{first.instance_id}/retry", headers=op
        ),
        409,
    )
    bulk = await client.post(
        "/api/v1/instances/retry-failed", json={"tenant": tokens.tenant_a}, headers=op
    )
    assert second.instance_id in bulk.json()["done"]
    await reached(store, second, InstanceStatus.COMPLETE)
    error_of(
        await client.post(
            "/api/v1/instances/retry-failed",
            json={"tenant": tokens.tenant_b},
            headers=bearer(tokens.a_operator),
        ),
        404,
    )
    error_of(await client.post("/api/v1/instances/retry-failed", json={}, headers=op), 422)


async def test_dead_letters_list_show_replay_purge_and_export(
    client, tokens, store, broker, topology, start_worker, order_wasm
):
    await start_worker()
    tenant = tokens.tenant_a
    digest = digest_of(order_wasm)
    ids = [f"late-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    await broker.publish_many([create_message(topology, tenant, i, digest) for i in ids])
    letters = [await dead_letter_of(store, i) for i in ids]
    viewer, op = bearer(tokens.a_viewer), bearer(tokens.a_operator)

    listed = await client.get(
        "/api/v1/dead-letters", params={"reason": "unknown-module", "limit": 2}, headers=viewer
    )
    page = listed.json()
    assert [i["id"] for i in page["items"]] == [letters[2].id, letters[1].id]
    rest = await client.get(
        "/api/v1/dead-letters",
        params={"reason": "unknown-module", "limit": 2, "cursor": page["next_cursor"]},
        headers=viewer,
    )
    assert letters[0].id in [i["id"] for i in rest.json()["items"]]
    by_instance = await client.get(
        "/api/v1/dead-letters", params={"instance": ids[0]}, headers=viewer
    )
    assert [i["id"] for i in by_instance.json()["items"]] == [letters[0].id]
    other = await client.get(
        "/api/v1/dead-letters", params={"tenant": tokens.tenant_b}, headers=viewer
    )
    error_of(other, 404)

    shown = (await client.get(f"/api/v1/dead-letters/{letters[0].id}", headers=viewer)).json()
    assert shown["reason"] == "unknown-module"
    assert shown["body"] == {"params": ORDER_PARAMS}
    assert shown["headers"]["x-dead-reason"] == "unknown-module"
    _, b_viewer = await issue_token(
        store, f"b-v-{uuid.uuid4().hex[:6]}", "viewer", tokens.tenant_b, actor="t"
    )
    error_of(
        await client.get(f"/api/v1/dead-letters/{letters[0].id}", headers=bearer(b_viewer)), 404
    )

    exported = await client.get(
        "/api/v1/dead-letters/export", params={"instance": ids[1]}, headers=viewer
    )
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in exported.text.splitlines()]
    assert [line["id"] for line in lines] == [letters[1].id]
    assert lines[0]["body"] == {"params": ORDER_PARAMS}

    error_of(await client.post(f"/api/v1/dead-letters/{letters[0].id}/replay", headers=viewer), 403)
    error_of(await client.post("/api/v1/dead-letters/replay", json={}, headers=op), 422)
    error_of(
        await client.post("/api/v1/dead-letters/replay", json={"ids": [999999999]}, headers=op),
        404,
    )
    await store.put_module(tenant, digest, order_wasm)
    replayed = await client.post(f"/api/v1/dead-letters/{letters[0].id}/replay", headers=op)
    assert replayed.json() == {"done": [letters[0].id], "skipped": {}, "published": True}
    await wait_for_status(store, InstanceKey(tenant, ids[0]), {InstanceStatus.COMPLETE})
    again = await client.post(f"/api/v1/dead-letters/{letters[0].id}/replay", headers=op)
    assert again.json()["skipped"] == {str(letters[0].id): "already replayed"}

    purged = await client.post("/api/v1/dead-letters/purge", json={"instance": ids[2]}, headers=op)
    assert purged.json()["done"] == [letters[2].id]
    assert not await store.dead_letters.find(
        LetterFilter(ids=(letters[2].id,), include_replayed=True)
    )

    entries = await store.dead_letters.audit_entries(limit=500)
    mine = {(e.action, e.target) for e in entries if e.actor == tokens.names["a_operator"]}
    assert ("dlq-replay", str(letters[0].id)) in mine
    assert ("dlq-purge", str(letters[2].id)) in mine


async def test_tenants_limits_hosts_and_modules(client, tokens, store, order_wasm):
    name = tokens.tenant_a
    await store.tenants.add(name, None, TenantLimits())
    await store.tenants.add(tokens.tenant_b, None, TenantLimits())
    await store.put_module(name, digest_of(order_wasm), order_wasm)
    admin = bearer(tokens.admin)

    everyone = await client.get("/api/v1/tenants", headers=bearer(tokens.viewer))
    assert {name, tokens.tenant_b} <= {t["name"] for t in everyone.json()}
    own = await client.get("/api/v1/tenants", headers=bearer(tokens.a_viewer))
    assert [t["name"] for t in own.json()] == [name]
    error_of(
        await client.get(f"/api/v1/tenants/{tokens.tenant_b}", headers=bearer(tokens.a_viewer)), 404
    )
    error_of(await client.get("/api/v1/tenants/nobody-here", headers=admin), 404)

    limits = {"running_steps": 4, "steps_per_second": 50}
    for weaker in (tokens.operator, tokens.a_admin):
        error_of(
            await client.put(f"/api/v1/tenants/{name}/limits", json=limits, headers=bearer(weaker)),
            403,
        )
    changed = await client.put(f"/api/v1/tenants/{name}/limits", json=limits, headers=admin)
    assert changed.json()["limits"] == limits
    error_of(
        await client.put(
            f"/api/v1/tenants/{name}/limits", json={"running_steps": -1}, headers=admin
        ),
        422,
    )
    error_of(
        await client.put(f"/api/v1/tenants/{name}/limits", json={"bogus": 1}, headers=admin), 422
    )
    error_of(await client.put("/api/v1/tenants/nobody-here/limits", json={}, headers=admin), 404)

    hosts = await client.post(
        f"/api/v1/tenants/{name}/hosts", json={"host": "API.example.com"}, headers=admin
    )
    assert hosts.json() == ["api.example.com"]
    error_of(
        await client.post(
            f"/api/v1/tenants/{name}/hosts", json={"host": "http://x/y"}, headers=admin
        ),
        422,
    )
    shown = (await client.get(f"/api/v1/tenants/{name}", headers=bearer(tokens.a_viewer))).json()
    assert shown["limits"] == limits
    assert shown["hosts"] == ["api.example.com"]
    assert digest_of(order_wasm) in [m["digest"] for m in shown["modules"]]
    removed = await client.delete(f"/api/v1/tenants/{name}/hosts/api.example.com", headers=admin)
    assert removed.json() == []
    error_of(
        await client.delete(f"/api/v1/tenants/{name}/hosts/api.example.com", headers=admin), 404
    )

    actions = [
        e.action
        for e in await store.dead_letters.audit_entries(limit=500)
        if e.target == name and e.actor == tokens.names["admin"]
    ]
    assert sorted(actions) == ["tenant-allow-host", "tenant-deny-host", "tenant-limits"]


async def test_audit_log_and_overview(client, tokens, store):
    audit = await client.get("/api/v1/audit", params={"limit": 2}, headers=bearer(tokens.viewer))
    assert audit.status_code == 200
    page = audit.json()
    assert len(page["items"]) <= 2
    if page["next_cursor"]:
        more = await client.get(
            "/api/v1/audit",
            params={"limit": 2, "cursor": page["next_cursor"]},
            headers=bearer(tokens.viewer),
        )
        assert more.json()["items"][0]["id"] < page["items"][-1]["id"]
    by_actor = await client.get(
        "/api/v1/audit",
        params={"actor": "tests", "action": "token-add"},
        headers=bearer(tokens.viewer),
    )
    assert by_actor.json()["items"]
    assert {i["actor"] for i in by_actor.json()["items"]} == {"tests"}
    error_of(await client.get("/api/v1/audit", headers=bearer(tokens.a_admin)), 403)

    overview = (await client.get("/api/v1/overview", headers=bearer(tokens.viewer))).json()
    assert overview["tenant"] is None
    assert isinstance(overview["queues"], dict)
    assert set(overview) >= {
        "workers",
        "instances_by_status",
        "dead_letters_by_reason",
        "steps_per_second",
    }
    scoped = (await client.get("/api/v1/overview", headers=bearer(tokens.a_viewer))).json()
    assert scoped["tenant"] == tokens.tenant_a
    assert scoped["queues"] is None
    assert scoped["workers"] == []


async def test_the_api_documents_itself(client):
    document = (await client.get("/api/v1/openapi.json")).json()
    assert "/api/v1/instances" in document["paths"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_an_action_without_rabbitmq_is_published_by_the_outbox_relay(
    settings, tokens, store, start_worker, playbook, monkeypatch
):
    """With RabbitMQ unreachable from the API, a restart still commits; its step message waits
    in the outbox and a worker's relay publishes it: the instance runs again."""
    await start_worker()
    key = await playbook({"op": "do", "name": "a"}, tenant=tokens.tenant_a)
    await finished(store, key)
    cut_off = create_app(settings)

    async def unreachable() -> None:
        return None  # what Fleet.broker answers while RabbitMQ cannot be reached

    monkeypatch.setattr(cut_off.state.fleet, "broker", unreachable)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=cut_off), base_url="http://api.test"
    ) as c:
        answer = await c.post(
            f"/api/v1/instances/{key.tenant}/{key.instance_id}/restart",
            headers=bearer(tokens.operator),
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["published"] is False
        listed = await c.get("/api/v1/instances", headers=bearer(tokens.viewer))
        assert listed.status_code == 200  # reads need no broker
        overview = await c.get("/api/v1/overview", headers=bearer(tokens.viewer))
        assert overview.json()["queues"] is None
    await cut_off.state.fleet.close()

    async def ran_again() -> bool:
        detail = await store.detail(key)
        assert detail is not None
        return detail.record.generation == 1 and detail.record.status is InstanceStatus.COMPLETE

    await wait_until(ran_again, "the relayed restart", timeout=30)
