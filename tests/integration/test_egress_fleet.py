"""Egress through the running fleet: the worker loads a tenant's allow list and its sealed
secret from PostgreSQL, the guest's call carries the secret, and the secret appears nowhere the
tenant or an operator's tools can read it (journal, status, logs, the database in clear)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from stepfleet.egress import new_key, seal_secret
from stepfleet.schemas import InstanceStatus, TenantLimits
from stepfleet.store import StoredSecret
from tests.conftest import capture_logs
from tests.integration.test_primitives import finished, output

pytestmark = pytest.mark.services

SECRET = "Bearer sk-live-" + uuid.uuid4().hex


class _Echo(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        body = json.dumps({"authorization": self.headers.get("Authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def echo() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_a_guest_call_carries_the_tenant_secret_it_never_sees(
    store, start_worker, playbook, echo
):
    tenant = f"egress{uuid.uuid4().hex[:8]}"
    key = new_key()
    await store.tenants.add(tenant, None, TenantLimits())
    await store.tenants.allow_host(tenant, echo)
    sealed = seal_secret(key, tenant, "api", echo, "Authorization", SECRET)
    await store.tenants.put_secret(StoredSecret(tenant, "api", echo, "Authorization", sealed))
    with capture_logs() as logs:
        await start_worker(secret_key=SecretStr(key))
        instance = await playbook(
            {"op": "http", "name": "call", "method": "GET", "url": f"http://{echo}/me"},
            tenant=tenant,
        )
        detail = await finished(store, instance)
    result = output(detail)["call"]
    assert result["status"] == 200
    assert json.loads(result["body"]) == {"authorization": "<redacted>"}

    token = SECRET.split()[-1]
    places = {
        "journal": json.dumps([e.value for e in detail.journal]),
        "output": detail.record.output or "",
        "logs": json.dumps(logs, default=str),
    }
    async with store._engine.connect() as connection:
        stored = (
            await connection.execute(
                text("SELECT ciphertext FROM tenant_secrets WHERE tenant = :t"), {"t": tenant}
            )
        ).scalar_one()
    places["database"] = bytes(stored).decode("latin-1")
    for place, content in places.items():
        assert token not in content, f"the secret leaked into the {place}"
    assert detail.record.status is InstanceStatus.COMPLETE


async def test_a_host_off_the_allow_list_is_refused_for_the_guest(
    store, start_worker, playbook, echo
):
    tenant = f"noegress{uuid.uuid4().hex[:8]}"
    await store.tenants.add(tenant, None, TenantLimits())
    await start_worker()
    instance = await playbook(
        {"op": "http", "name": "call", "method": "GET", "url": f"http://{echo}/me"},
        tenant=tenant,
    )
    result = output(await finished(store, instance))["call"]
    assert "error" in result
    assert "allow list" in result["error"]
