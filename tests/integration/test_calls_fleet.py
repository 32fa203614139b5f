"""Steps that wait on the network, through the running fleet: calls overlap on one worker,
a tenant's calls in flight stay within its cap, the step timeout still ends a hung call, and
a worker killed with calls in flight loses no workflow and journals no step twice."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import InstanceKey, InstanceStatus, TenantLimits, digest_of
from tests.integration.conftest import wait_for_status, wait_until
from tests.integration.test_faults import spawn, wait_complete, worker_env
from tests.integration.test_primitives import FINAL, finished, output

pytestmark = pytest.mark.services


class SlowServer(ThreadingHTTPServer):
    """Answers every GET after `delay` seconds (a `/hang` never, until closed); counts the
    requests in flight at once, per first path segment (the tests put the tenant there)."""

    daemon_threads = True

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _Slow)
        self.delay = delay
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total = 0
        self.closing = threading.Event()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def enter(self, group: str) -> None:
        with self.lock:
            self.total += 1
            self.in_flight[group] = self.in_flight.get(group, 0) + 1
            self.peak[group] = max(self.peak.get(group, 0), self.in_flight[group])

    def leave(self, group: str) -> None:
        with self.lock:
            self.in_flight[group] -= 1


class _Slow(BaseHTTPRequestHandler):
    server: SlowServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        group = self.path.split("/")[1]
        self.server.enter(group)
        try:
            hang = self.path.endswith("/hang")
            self.server.closing.wait(None if hang else self.server.delay)
        finally:
            # Counted out before the answer goes: its caller may send its next request as
            # soon as it has the answer, before this thread would get to count it out.
            self.server.leave(group)
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def slow() -> Iterator[SlowServer]:
    server = SlowServer(delay=0.3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.closing.set()
    server.shutdown()
    server.server_close()


async def allowed_tenant(store, server: SlowServer, **limits: Any) -> str:
    tenant = f"io{uuid.uuid4().hex[:8]}"
    await store.tenants.add(tenant, None, TenantLimits(**limits))
    await store.tenants.allow_host(tenant, server.host)
    return tenant


async def create_calls(
    settings, topology, store, playbook_wasm, tenant: str, url: str, count: int, calls: int = 1
) -> list[InstanceKey]:
    digest = digest_of(playbook_wasm)
    await store.put_module(tenant, digest, playbook_wasm)
    ops = [{"op": "http", "name": f"call-{i}", "url": url} for i in range(calls)]
    requests = [
        CreateRequest(tenant, digest, {"ops": ops}, f"io-{n}-{uuid.uuid4().hex[:8]}")
        for n in range(count)
    ]
    async with Producer(settings.amqp_url, topology) as producer:
        await producer.create_batch(requests)
    return [InstanceKey(tenant, r.instance_id) for r in requests]


async def test_calls_of_many_workflows_overlap_on_one_worker(
    settings, topology, store, start_worker, playbook_wasm, slow
):
    tenant = await allowed_tenant(store, slow)
    url = f"http://{slow.host}/{tenant}/work"
    await start_worker()
    keys = await create_calls(settings, topology, store, playbook_wasm, tenant, url, 40, calls=2)
    for key in keys:
        detail = await finished(store, key, timeout=60)
        assert output(detail)["call-1"]["status"] == 200
    assert slow.total == 80
    # One worker process, one guest thread: the server still saw many calls at once.
    assert slow.peak[tenant] >= 10, slow.peak


async def test_a_tenant_never_has_more_calls_in_flight_than_its_cap(
    settings, topology, store, start_worker, playbook_wasm, slow
):
    capped = await allowed_tenant(store, slow, calls_in_flight=3)
    other = await allowed_tenant(store, slow)
    await start_worker()
    keys = await create_calls(
        settings, topology, store, playbook_wasm, capped, f"http://{slow.host}/{capped}/x", 15
    )
    keys += await create_calls(
        settings, topology, store, playbook_wasm, other, f"http://{slow.host}/{other}/x", 15
    )
    for key in keys:
        await finished(store, key, timeout=60)
    assert slow.peak[capped] == 3
    assert slow.peak[other] > 3


async def test_the_step_timeout_ends_an_attempt_whose_call_hangs(
    settings, topology, store, start_worker, playbook, slow
):
    tenant = await allowed_tenant(store, slow)
    await start_worker()
    op = {"op": "http", "name": "hang", "url": f"http://{slow.host}/{tenant}/hang"}
    key = await playbook({**op, "timeout_ms": 500}, tenant=tenant)

    async def attempts() -> list[Any]:
        detail = await store.detail(key)
        return [] if detail is None else detail.attempts

    async def failed_once() -> bool:
        return bool(await attempts())

    await wait_until(failed_once, "the first attempt failed")
    [first, *_] = await attempts()
    assert (first.name, first.error) == ("hang", "step 'hang' timed out after 500 ms")


@pytest.mark.timeout(180)
async def test_a_worker_killed_with_calls_in_flight_loses_nothing(
    settings, topology, store, playbook_wasm, slow, tmp_path
):
    tenant = await allowed_tenant(store, slow)
    url = f"http://{slow.host}/{tenant}/x"
    env = worker_env(settings)
    log = tmp_path / "workers.log"
    worker = spawn(env, log)
    count = 60
    keys = await create_calls(settings, topology, store, playbook_wasm, tenant, url, count, 3)
    await wait_until(lambda: slow.in_flight.get(tenant, 0) >= 5, "calls in flight", 30)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    worker = spawn(env, log)
    try:
        report = await wait_complete(store, tenant, count, timeout=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert report == {"complete": count, "entries": count * 3, "repeated_steps": 0}, report
    for key in keys[:3]:
        record, _ = await wait_for_status(store, key, FINAL)
        assert record.status is InstanceStatus.COMPLETE
