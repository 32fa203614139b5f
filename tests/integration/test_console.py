"""The console's login, cookie and form protections, through an ASGI client."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from stepfleet.api import ApiSettings, create_app
from stepfleet.api.tokens import issue_token
from stepfleet.schemas import InstanceStatus, TenantLimits, digest_of
from tests.integration.test_primitives import reached

pytestmark = pytest.mark.services

WEEK_MS = 7 * 86400 * 1000


@pytest.fixture
async def web(settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, ApiSettings(max_body_bytes=4096))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as c:
        yield c
    await app.state.fleet.close()


async def _login(web: httpx.AsyncClient, secret: str) -> str:
    answer = await web.post("/login", data={"token": secret})
    assert answer.status_code == 303, answer.text
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
    page = await web.get("/")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert found, "no form token on the page"
    return found.group(1)


async def test_pages_need_a_login_and_a_bad_token_is_refused(web, store):
    for path in ("/", "/instances", "/dead-letters", "/tenants", "/dead-letters/1"):
        answer = await web.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"] == "/login"
    refused = await web.post("/login", data={"token": "sft_nope"})
    assert refused.status_code == 401
    assert "Unknown or revoked token" in refused.text
    assert "set-cookie" not in refused.headers
    # The JSON API does not take the console's cookie.
    _, secret = await issue_token(store, f"web-{uuid.uuid4().hex[:6]}", "viewer", None, actor="t")
    await _login(web, secret)
    assert (await web.get("/api/v1/instances")).status_code == 401


async def test_forms_need_their_token_the_same_origin_and_the_role(
    web, store, start_worker, playbook
):
    await start_worker()
    tenant = f"con{uuid.uuid4().hex[:8]}"
    key = await playbook({"op": "sleep", "name": "nap", "ms": WEEK_MS}, tenant=tenant)
    await reached(store, key, InstanceStatus.SLEEPING)
    url = f"/instances/{key.tenant}/{key.instance_id}"

    _, viewer = await issue_token(store, f"v-{uuid.uuid4().hex[:6]}", "viewer", None, actor="t")
    csrf = await _login(web, viewer)
    page = await web.get(url)
    assert page.status_code == 200
    assert 'id="instance-status">sleeping' in page.text
    assert "action-pause" not in page.text  # a viewer is shown no actions
    assert (await web.post(f"{url}/pause", data={"csrf": csrf})).status_code == 403

    name = f"op-{uuid.uuid4().hex[:6]}"
    _, operator = await issue_token(store, name, "operator", None, actor="t")
    csrf = await _login(web, operator)
    assert (await web.post(f"{url}/pause", data={})).status_code == 403
    assert (await web.post(f"{url}/pause", data={"csrf": "0" * 64})).status_code == 403
    cross = await web.post(
        f"{url}/pause", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    assert "another site" in cross.text
    detail = await store.detail(key)
    assert detail is not None
    assert detail.record.status is InstanceStatus.SLEEPING  # nothing happened

    done = await web.post(f"{url}/pause", data={"csrf": csrf})
    assert done.status_code == 303
    assert "pause" in done.headers["location"]
    detail = await store.detail(key)
    assert detail is not None
    assert detail.record.status is InstanceStatus.PAUSED
    assert (await web.post(f"{url}/resume", data={"csrf": csrf})).status_code == 303
    refused = await web.post(f"{url}/resume", data={"csrf": csrf}, follow_redirects=True)
    assert "resume refused" in refused.text
    assert "not paused" in refused.text
    entries = await store.dead_letters.audit_entries(action="pause", limit=50)
    assert any(e.actor == name and e.target == f"{key.tenant}/{key.instance_id}" for e in entries)

    # Bad input gets a page, not a trace.
    bad = await web.get("/instances", params={"status": "asleep"})
    assert bad.status_code == 422
    assert "Traceback" not in bad.text
    assert (await web.get("/instances/Bad Tenant/x")).status_code == 422
    assert (await web.get(f"/instances/{tenant}/missing")).status_code == 404
    assert (await web.post(f"{url}/explode", data={"csrf": csrf})).status_code == 404
    big = await web.post(f"{url}/restart", data={"csrf": csrf, "from_step": "x" * 10_000})
    assert big.status_code == 413

    timeline = await web.get(f"{url}/timeline")
    assert 'hx-get="' in timeline.text  # htmx reloads it while the instance lives
    out = await web.post("/logout", data={"csrf": csrf})
    assert out.status_code == 303
    assert (await web.get("/")).status_code == 303


async def test_the_tenants_page_shows_each_tenants_modules(web, store, order_wasm):
    tenant = f"mods{uuid.uuid4().hex[:8]}"
    await store.tenants.add(tenant, None, TenantLimits())
    await store.put_module(tenant, digest_of(order_wasm), order_wasm)
    _, viewer = await issue_token(store, f"m-{uuid.uuid4().hex[:6]}", "viewer", tenant, actor="t")
    await _login(web, viewer)
    page = await web.get("/tenants")
    assert page.status_code == 200
    assert f'title="{digest_of(order_wasm)}"' in page.text
    assert digest_of(order_wasm)[:19] in page.text
