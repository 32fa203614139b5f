"""Guest HTTP egress: the real WasmSandbox and EgressGateway against a loopback HTTP server.

The playbook module's `http` op makes the calls; a local http.server (127.0.0.1, port 0) echoes
what it received, so the tests can check what reached the server (the injected secret) and what
reached the guest (the secret scrubbed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
import wasmtime
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stepfleet.cycle.calls import CallScheduler
from stepfleet.cycle.work import Suspended, Work
from stepfleet.egress import (
    EgressGateway,
    HostError,
    SealError,
    new_key,
    normalize_host_entry,
    open_sealed,
    open_secret,
    open_secrets,
    parse_url,
    seal,
    seal_secret,
)
from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import (
    GuestRun,
    ReplayJournal,
    SandboxLimits,
    WasmSandbox,
    encode_replay_buffer,
)
from stepfleet.schemas import (
    CallRequested,
    Envelope,
    GuestCrashed,
    GuestReport,
    HttpRequest,
    HttpResponse,
    InstanceKey,
    InstanceStatus,
    MessageKind,
    StepBody,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
    digest_of,
)
from stepfleet.store import StoredSecret
from tests.conftest import capture_logs

TENANT = "acme"
TOKEN = "s3cr3t-T0ken-9f8e7d6c"
SECRET = f"Bearer {TOKEN}"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = SandboxLimits(fuel_per_run=200_000_000, memory_bytes=16 * 1024 * 1024)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hits: list[tuple[str, str | None]]
    release: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":  # the answer to HEAD has no body (RFC 9110 9.3.2)
                self.wfile.write(body)
        except OSError:
            pass  # the gateway gave up on us (a timeout test)

    def _handle(self) -> None:
        auth = self.headers.get("Authorization")
        self.server.hits.append((self.path, auth))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        if self.path.startswith("/slow"):
            self.server.release.wait(5)
            self._send(200, b"late")
        elif self.path.startswith("/redirect"):
            port = self.server.server_address[1]
            self._send(302, b"", {"Location": f"http://127.0.0.1:{port}/target"})
        elif self.path.startswith("/big"):
            self._send(200, b"x" * 5000)
        elif self.path.startswith("/unsized"):
            # HTTP/1.0, no Content-Length: the body ends when the connection does.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"y" * 5000)
        elif self.path.startswith("/cookie"):
            self._send(200, b"set", {"Set-Cookie": "session=acme-only; Path=/"})
        elif self.path.startswith("/headers"):
            self.send_response(200)
            self.send_header("X-Multi", "a")
            self.send_header("X-Multi", "b")
            self.send_header("X-Latin", "caf\xe9")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"\xff\xfeok")
        else:
            echoed = auth or ""
            token = echoed.split()[-1] if echoed else ""
            payload = {
                "method": self.command,
                "path": self.path,
                "authorization": echoed,
                "token": token,
                "quoted": quote(echoed, safe=""),
                "x_guest": self.headers.get("X-Guest"),
                "cookie": self.headers.get("Cookie"),
                "user_agent": self.headers.get("User-Agent"),
                "accept_encoding": self.headers.get("Accept-Encoding"),
                "body": body,
            }
            self._send(
                200,
                json.dumps(payload).encode(),
                {"Content-Type": "application/json", "X-Echo-Auth": echoed},
            )

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.hits = []
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, name="egress-test-server", daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def hits(server: _Server) -> list[tuple[str, str | None]]:
    server.hits.clear()
    return server.hits


def base(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def gateway_for(server: _Server, *other_ports: int, **options: Any) -> EgressGateway:
    """A gateway that lets TENANT call `server` (with SECRET) and the other local ports."""
    gateway = EgressGateway(**options)
    entry = f"127.0.0.1:{server.server_address[1]}"
    allowed = {entry} | {f"127.0.0.1:{port}" for port in other_ports}
    assert gateway.configure({TENANT: allowed}, [(TENANT, entry, "Authorization", SECRET)]) == []
    return gateway


@contextlib.asynccontextmanager
async def opened(gateway: EgressGateway) -> AsyncIterator[EgressGateway]:
    """The gateway, closed afterwards."""
    try:
        yield gateway
    finally:
        await gateway.aclose()


@pytest.fixture(scope="module")
async def gateway(server: _Server) -> AsyncIterator[EgressGateway]:
    async with opened(gateway_for(server, call_timeout_s=3.0, max_response_bytes=1000)) as gw:
        yield gw


Perform = Callable[[EgressGateway, str, HttpRequest, float], Awaitable[HttpResponse]]


@pytest.fixture
def perform() -> Perform:
    """One call through the gateway."""

    async def awaited(
        gateway: EgressGateway, tenant: str, call: HttpRequest, timeout_s: float
    ) -> HttpResponse:
        return await gateway.call(tenant, call, timeout_s)

    return awaited


class Guests:
    """The sandbox with the worker's call loop around it: a run that stops at a call has the
    gateway make it, then runs again with the answers so far, as the step cycle does."""

    def __init__(self, limits: SandboxLimits, gateway: EgressGateway | None) -> None:
        self.sandbox = WasmSandbox(limits)
        self.limits = self.sandbox.limits
        self.calls = CallScheduler(gateway, max_in_flight=10, tenant_cap=lambda _: 10)

    def is_loaded(self, digest: str) -> bool:
        return self.sandbox.is_loaded(digest)

    def load(self, digest: str, wasm: bytes) -> None:
        self.sandbox.load(digest, wasm)

    def close(self) -> None:
        self.sandbox.close()

    async def run(self, job: GuestRun, tenant: str = TENANT) -> GuestReport:
        while True:
            report = self.sandbox.run(job)
            call = report.outcome
            if not isinstance(call, CallRequested):
                return report
            body = StepBody(position=job.journal_length)
            work = Work(None, Envelope(MessageKind.STEP, tenant, "i-1", job.digest, body))
            answered = await self.calls.answer(Suspended(work, call))
            job = replace(job, answers=answered.answers, step_deadline=call.deadline)


@pytest.fixture(scope="module")
def sandbox(gateway: EgressGateway) -> Iterator[Guests]:
    guests = Guests(LIMITS, gateway)
    yield guests
    guests.close()


def load(sandbox: Guests, wasm: bytes) -> str:
    digest = digest_of(wasm)
    if not sandbox.is_loaded(digest):
        sandbox.load(digest, wasm)
    return digest


async def run_ops(sandbox: Guests, wasm: bytes, *ops: dict[str, Any], **job: Any) -> GuestReport:
    """One run of the playbook over an empty journal (resumed after each call)."""
    digest = load(sandbox, wasm)
    params = json.dumps({"ops": list(ops)})
    buffer = encode_replay_buffer("i-1", params, ReplayJournal())
    tenant = job.pop("tenant", TENANT)
    return await sandbox.run(GuestRun(digest, buffer, 0, **job), tenant)


def http_result(report: GuestReport) -> dict[str, Any]:
    """The recorded result of the run's http step."""
    assert isinstance(report.outcome, StepSucceeded), report.outcome
    result: dict[str, Any] = json.loads(report.outcome.result)
    return result


def wat_module(body: str, data: str) -> bytes:
    """A raw module calling the stepfleet imports directly, with `data` at offset 64."""
    escaped = data.replace("\\", "\\\\").replace('"', '\\"')
    return wasmtime.wat2wasm(
        f"""
        (module
          (import "stepfleet" "step_begin" (func $begin (param i32 i32 i32 i32 i32) (result i32)))
          (import "stepfleet" "http_request" (func $http (param i32 i32) (result i32)))
          (import "stepfleet" "complete" (func $complete (param i32 i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "s")
          (data (i32.const 64) "{escaped}")
          (func (export "sf_abi_version") (result i32) i32.const 2)
          (func (export "sf_alloc") (param i32) (result i32) i32.const 4096)
          (func (export "sf_run") (param i32 i32) {body}))
        """
    )


# -- through the sandbox ---------------------------------------------------------------------


async def test_allowed_host_gets_the_secret_and_the_guest_never_sees_it(
    sandbox, playbook_wasm, server, hits
):
    """The secret replaces the guest's Authorization; every echo of it comes back scrubbed."""
    report = await run_ops(
        sandbox,
        playbook_wasm,
        {
            "op": "http",
            "name": "call",
            "method": "POST",
            "url": base(server) + "/echo?q=1",
            "headers": {"Authorization": "Bearer guest-chosen", "X-Guest": "yes"},
            "body": "hello",
            "with_headers": True,
        },
    )
    assert hits == [("/echo?q=1", SECRET)]
    result = http_result(report)
    assert result["status"] == 200
    echoed = json.loads(result["body"])
    assert echoed["method"] == "POST"
    assert echoed["x_guest"] == "yes"
    assert echoed["body"] == "hello"
    assert echoed["authorization"] == "<redacted>"
    assert echoed["token"] == "<redacted>"
    assert echoed["quoted"] == "<redacted>"
    assert result["headers"]["x-echo-auth"] == "<redacted>"
    assert result["headers"]["content-type"] == "application/json"
    text = report.outcome.result
    for leak in (SECRET, TOKEN, quote(SECRET, safe="")):
        assert leak not in text
        assert all(leak not in line for _, line in report.logs)


async def test_the_recorded_journal_and_output_never_hold_the_secret(
    sandbox, playbook_wasm, server, hits
):
    """Driven to completion as the fleet would: no journal value, output or log has it."""
    params = json.dumps(
        {
            "ops": [
                {"op": "http", "name": "a", "url": base(server) + "/echo", "with_headers": True},
                {"op": "now", "name": "t"},
                {"op": "http", "name": "b", "url": base(server) + "/echo", "body": "again"},
            ]
        }
    )
    digest = load(sandbox, playbook_wasm)
    journal = ReplayJournal()
    key = InstanceKey(TENANT, "i-1")
    logs: list[str] = []
    with capture_logs() as events:
        for _ in range(10):
            buffer = encode_replay_buffer(key.instance_id, params, journal)
            report = await sandbox.run(GuestRun(digest, buffer, len(journal)))
            logs.extend(line for _, line in report.logs)
            state = InstanceState(key, digest, InstanceStatus.RUNNING, len(journal))
            decision = decide(
                state, journal.entries, report, started_at=T0, finished_at=T0, limits=EngineLimits()
            )
            journal.extend(decision.entries)
            if decision.status.is_final:
                break
    assert decision.status is InstanceStatus.COMPLETE, decision.error
    calls = [e for e in events if e["event"] == "egress_call"]
    assert [(c["tenant"], c["outcome"]) for c in calls] == [(TENANT, "200"), (TENANT, "200")]
    log_text = repr(events)
    output = json.loads(decision.output or "{}")
    assert output["a"]["status"] == 200
    assert output["b"]["status"] == 200
    assert [path for path, _ in hits] == ["/echo", "/echo"], "replay repeated a call"
    recorded = [entry.value for entry in journal.entries] + [decision.output or ""] + logs
    for leak in (SECRET, TOKEN):
        assert all(leak not in value for value in recorded)
        assert leak not in log_text
    assert "X-Guest" not in log_text


def off_the_list(server: _Server) -> dict[str, str]:
    """URLs the tenant may not call (the server's port is allowed), and why, in part."""
    port = server.server_address[1]
    return {
        f"http://localhost:{port}/echo": "not on the egress allow list",
        f"http://127.1:{port}/echo": "neither a host name nor",
        f"http://2130706433:{port}/echo": "neither a host name nor",
        f"http://0x7f.0.0.1:{port}/echo": "neither a host name nor",
        f"http://user:pw@127.0.0.1:{port}/echo": "userinfo",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/echo": "allow list",
        "http://127.0.0.1/echo": "127.0.0.1 port 80 is not on the egress allow list",
        "https://127.0.0.1/echo": "127.0.0.1 port 443 is not on the egress allow list",
        f"ftp://127.0.0.1:{port}/": "only http and https",
        f"http://127.0.0.1%3a{port}/": "percent-encoded",
    }


async def test_a_host_off_the_allow_list_is_refused_with_an_error_the_guest_gets(
    sandbox, playbook_wasm, server, hits
):
    for url, message in off_the_list(server).items():
        result = http_result(
            await run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url})
        )
        assert set(result) == {"error"}, url
        assert message in result["error"], (url, result)
    other = http_result(
        await run_ops(
            sandbox,
            playbook_wasm,
            {"op": "http", "name": "x", "url": base(server) + "/echo"},
            tenant="globex",
        )
    )
    assert "not on the egress allow list of tenant 'globex'" in other["error"]
    assert hits == []


async def test_guests_may_not_set_framing_headers_or_unknown_methods(
    sandbox, playbook_wasm, server, hits
):
    for op, message in (
        ({"headers": {"Host": "evil.example"}}, "may not be set by a guest"),
        ({"headers": {"Transfer-Encoding": "chunked"}}, "may not be set by a guest"),
        ({"headers": {"X-Bad": "a\r\nInjected: 1"}}, "line breaks"),
        ({"method": "CONNECT"}, "method 'CONNECT' is not allowed"),
    ):
        result = http_result(
            await run_ops(
                sandbox,
                playbook_wasm,
                {"op": "http", "name": "x", "url": base(server) + "/echo", **op},
            )
        )
        assert message in result.get("error", ""), (op, result)
    assert hits == []


async def test_the_call_cap_per_step_is_enforced(sandbox, playbook_wasm, server, hits):
    """The default cap (10), and a run's own cap, count every call of one step."""
    url = base(server) + "/echo"
    ok = http_result(
        await run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url, "repeat": 10})
    )
    assert ok["status"] == 200
    assert len(hits) == 10
    hits.clear()
    over = http_result(
        await run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url, "repeat": 11})
    )
    assert over == {"error": "host call limit reached: a step may make 10 HTTP call(s)"}
    assert len(hits) == 10
    hits.clear()
    capped = http_result(
        await run_ops(
            sandbox,
            playbook_wasm,
            {"op": "http", "name": "x", "url": url, "repeat": 3},
            host_calls_per_step=2,
        )
    )
    assert "a step may make 2 HTTP call(s)" in capped["error"]
    assert len(hits) == 2
    hits.clear()
    none = http_result(
        await run_ops(
            sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url}, host_calls_per_step=0
        )
    )
    assert "a step may make 0 HTTP call(s)" in none["error"]
    assert hits == []


async def test_a_slow_server_hits_the_gateway_timeout(playbook_wasm, server, hits):
    gateway = gateway_for(server, call_timeout_s=0.3)
    sandbox = Guests(LIMITS, gateway)
    try:
        result = http_result(
            await run_ops(
                sandbox, playbook_wasm, {"op": "http", "name": "x", "url": base(server) + "/slow"}
            )
        )
    finally:
        sandbox.close()
        await gateway.aclose()
    # The server answers only after 5 s (or when released): an error means the gateway gave
    # up first, at its own 0.3 s (socket timeout or deadline, whichever noticed).
    assert result["error"] in ("timed out", "timed out after 0.3 s")
    assert [path for path, _ in hits] == ["/slow"]


async def test_the_call_timeout_is_bounded_by_the_time_left_in_the_step(
    sandbox, playbook_wasm, server, hits
):
    """A gateway timeout of 3 s, a step timeout of 300 ms: the call gives up with the step."""
    report = await run_ops(
        sandbox,
        playbook_wasm,
        {"op": "http", "name": "x", "url": base(server) + "/slow", "timeout_ms": 300},
    )
    outcome = report.outcome
    if isinstance(outcome, StepFailed):
        assert outcome.message == "step 'x' timed out after 300 ms"
    else:
        # The call's own timeout was cut to what was left of the step's 300 ms, not 3 s.
        error = http_result(report)["error"]
        assert error == "timed out" or error.startswith("timed out after 0.")


async def test_redirects_are_not_followed(sandbox, playbook_wasm, server, hits):
    result = http_result(
        await run_ops(
            sandbox,
            playbook_wasm,
            {"op": "http", "name": "x", "url": base(server) + "/redirect", "with_headers": True},
        )
    )
    assert result["status"] == 302
    assert result["headers"]["location"].endswith("/target")
    assert [path for path, _ in hits] == ["/redirect"]


async def test_a_response_body_over_the_limit_is_refused(sandbox, playbook_wasm, server, hits):
    result = http_result(
        await run_ops(
            sandbox, playbook_wasm, {"op": "http", "name": "x", "url": base(server) + "/big"}
        )
    )
    assert result == {"error": "response body of 5000 bytes is over the limit of 1000"}


async def test_without_a_gateway_every_call_fails(playbook_wasm, server, hits):
    sandbox = Guests(LIMITS, None)
    try:
        result = http_result(
            await run_ops(
                sandbox, playbook_wasm, {"op": "http", "name": "x", "url": base(server) + "/echo"}
            )
        )
    finally:
        sandbox.close()
    assert result == {"error": "egress is not configured"}
    assert hits == []


async def test_a_call_outside_a_step_is_an_abi_violation(sandbox, server, hits):
    request = json.dumps({"method": "GET", "url": base(server) + "/echo"})
    wasm = wat_module(f"(drop (call $http (i32.const 64) (i32.const {len(request)})))", request)
    report = await sandbox.run(
        GuestRun(load(sandbox, wasm), encode_replay_buffer("i-1", "{}", ReplayJournal()))
    )
    assert isinstance(report.outcome, GuestCrashed)
    assert "http_request called outside a step" in report.outcome.message
    assert hits == []


async def test_a_malformed_request_is_an_abi_violation(sandbox, server, hits):
    request = '{"method":"GET","url":' + json.dumps(base(server)) + ',"headers":{"a":1}}'
    body = (
        "(drop (call $begin (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 0) (i32.const 0)))"
        f"(drop (call $http (i32.const 64) (i32.const {len(request)})))"
    )
    report = await sandbox.run(
        GuestRun(
            load(sandbox, wat_module(body, request)),
            encode_replay_buffer("i-1", "{}", ReplayJournal()),
        )
    )
    assert isinstance(report.outcome, GuestCrashed)
    assert '"headers" must be an object whose values are strings' in report.outcome.message
    assert hits == []


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({}, "params.ops[0].url is required"),
        ({"url": 1}, "params.ops[0].url must be a string"),
        ({"url": "u", "headers": {"a": 1}}, "params.ops[0].headers must be an object of strings"),
        ({"url": "u", "repeat": 101}, "params.ops[0].repeat must be an integer from 1 to 100"),
    ],
)
async def test_the_playbook_checks_its_http_ops_first(sandbox, playbook_wasm, op, message):
    report = await run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", **op})
    assert isinstance(report.outcome, WorkflowFailed)
    assert report.outcome.message == message


# -- both ways of calling: `request` (blocking) and `call` (awaited) ----------------------------


def get(url: str, **fields: Any) -> HttpRequest:
    return HttpRequest(fields.pop("method", "GET"), url, **fields)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def silent() -> Iterator[int]:
    """A server that accepts connections and never answers: the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, name="egress-test-silent", daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


async def test_the_secret_goes_to_the_host_and_every_echo_of_it_is_scrubbed(
    perform, gateway, server, hits
):
    answer = await perform(
        gateway,
        TENANT,
        get(
            base(server) + "/echo?q=1",
            method="post",
            headers={"authorization": "Bearer guest-chosen", "X-Guest": "yes"},
            body="hello",
        ),
        3.0,
    )
    assert hits == [("/echo?q=1", SECRET)]
    assert answer.error is None
    assert answer.status == 200
    echoed = json.loads(answer.body)
    assert echoed["method"] == "POST"
    assert (echoed["x_guest"], echoed["body"]) == ("yes", "hello")
    assert echoed["authorization"] == echoed["token"] == echoed["quoted"] == "<redacted>"
    assert echoed["user_agent"] == "stepfleet-egress"
    assert echoed["accept_encoding"] == "identity"
    assert answer.headers["x-echo-auth"] == "<redacted>"
    assert answer.headers["content-type"] == "application/json"
    for leak in (SECRET, TOKEN, quote(SECRET, safe=""), json.dumps(SECRET)[1:-1]):
        assert leak not in answer.to_json()


async def test_an_error_message_echoing_the_secret_is_scrubbed(perform, server, hits):
    """The JSON-escaped form too: a secret with a quote in it, echoed in a refusal."""
    gateway = gateway_for(server)
    secret = 'k"ey-' + "x" * 12
    gateway.configure({TENANT: {"api.example.com"}}, [(TENANT, "api.example.com", "X-Key", secret)])
    async with opened(gateway):
        answer = await perform(gateway, TENANT, get(f"http://{secret}.example/"), 1.0)
    assert answer.error is not None
    assert secret not in answer.error
    assert json.dumps(secret)[1:-1] not in answer.error
    assert "<redacted>" in answer.error


async def test_hosts_off_the_allow_list_are_refused(perform, gateway, server, hits):
    port = server.server_address[1]
    for url, message in off_the_list(server).items():
        answer = await perform(gateway, TENANT, get(url), 1.0)
        assert answer.error is not None, url
        assert message in answer.error, (url, answer)
    other = await perform(gateway, "globex", get(base(server) + "/echo"), 1.0)
    assert other.error == (
        f"127.0.0.1 port {port} is not on the egress allow list of tenant 'globex'"
    )
    for fields, message in (
        ({"headers": {"Host": "evil.example"}}, "may not be set by a guest"),
        ({"headers": {"Connection": "keep-alive"}}, "may not be set by a guest"),
        ({"headers": {"X-Bad": "a\r\nInjected: 1"}}, "line breaks"),
        ({"method": "TRACE"}, "method 'TRACE' is not allowed"),
    ):
        answer = await perform(gateway, TENANT, get(base(server) + "/echo", **fields), 1.0)
        assert message in (answer.error or ""), (fields, answer)
    assert hits == []


async def test_secrets_are_only_sent_over_https_to_hosts_off_the_loopback(perform):
    gateway = EgressGateway()
    gateway.configure(
        {TENANT: {"api.example.com"}}, [(TENANT, "api.example.com", "X-Api-Key", "k" * 20)]
    )
    async with opened(gateway):
        answer = await perform(gateway, TENANT, get("http://api.example.com/"), 1.0)
    assert answer.error == "a secret is configured for api.example.com: it is only sent over https"


async def test_a_redirect_is_the_answer(perform, gateway, server, hits):
    answer = await perform(gateway, TENANT, get(base(server) + "/redirect"), 3.0)
    assert answer.status == 302
    assert answer.headers["location"].endswith("/target")
    assert [path for path, _ in hits] == ["/redirect"]


async def test_headers_and_body_come_back_as_sent(perform, gateway, server, hits):
    answer = await perform(gateway, TENANT, get(base(server) + "/headers"), 3.0)
    assert answer.status == 200
    assert answer.headers["x-multi"] == "a, b"
    assert answer.headers["x-latin"] == "café"
    assert answer.body == "\ufffd\ufffdok"
    head = await perform(gateway, TENANT, get(base(server) + "/echo", method="HEAD"), 3.0)
    assert (head.status, head.body) == (200, "")


async def test_response_bodies_over_the_limit_are_refused(perform, gateway, server, hits):
    declared = await perform(gateway, TENANT, get(base(server) + "/big"), 3.0)
    assert declared.error == "response body of 5000 bytes is over the limit of 1000"
    streamed = await perform(gateway, TENANT, get(base(server) + "/unsized"), 3.0)
    assert streamed.error == "response body is over the limit of 1000 bytes"
    fits = await perform(gateway, TENANT, get(base(server) + "/echo"), 3.0)
    assert fits.status == 200


async def test_slow_and_silent_servers_hit_the_deadline(perform, server, silent, hits):
    async with opened(gateway_for(server, silent, call_timeout_s=0.3)) as gateway:
        slow = await perform(gateway, TENANT, get(base(server) + "/slow"), 3.0)
        mute = await perform(gateway, TENANT, get(f"http://127.0.0.1:{silent}/"), 3.0)
        # The step's time left (200 ms) is shorter than the gateway's timeout.
        cut = await perform(gateway, TENANT, get(f"http://127.0.0.1:{silent}/"), 0.2)
        none = await perform(gateway, TENANT, get(f"http://127.0.0.1:{silent}/"), 0.0)
    # The sync transport may notice first with its socket timeout ("timed out").
    assert slow.error in ("timed out", "timed out after 0.3 s")
    assert mute.error in ("timed out", "timed out after 0.3 s")
    assert cut.error in ("timed out", "timed out after 0.2 s")
    assert none.error == "no time left for the call"
    assert [path for path, _ in hits] == ["/slow"]


async def test_network_failures_are_answers(perform, server):
    closed = free_port()
    async with opened(gateway_for(server, closed)) as gateway:
        refused = await perform(gateway, TENANT, get(f"http://127.0.0.1:{closed}/"), 2.0)
    assert refused.error == "connection refused"


async def test_calls_are_logged_without_path_headers_or_secrets(perform, gateway, server, hits):
    with capture_logs() as events:
        await perform(
            gateway,
            TENANT,
            get(base(server) + "/echo/private", headers={"X-Guest": "yes"}, body="b0dy"),
            3.0,
        )
        await perform(gateway, TENANT, get("http://elsewhere.example/"), 3.0)
    calls = [event for event in events if event["event"] == "egress_call"]
    assert [(c["tenant"], c["method"], c["to"], c["outcome"]) for c in calls] == [
        (TENANT, "GET", f"http://127.0.0.1:{server.server_address[1]}", "200"),
        (TENANT, "GET", "(refused)", "error"),
    ]
    text = repr(events)
    for leak in (SECRET, TOKEN, "/echo/private", "X-Guest", "b0dy"):
        assert leak not in text


async def test_cookies_are_not_kept_between_calls(perform, gateway, server, hits):
    first = await perform(gateway, TENANT, get(base(server) + "/cookie"), 3.0)
    assert first.headers["set-cookie"] == "session=acme-only; Path=/"
    later = await perform(gateway, TENANT, get(base(server) + "/echo"), 3.0)
    assert json.loads(later.body)["cookie"] is None
    own = await perform(gateway, TENANT, get(base(server) + "/echo", headers={"Cookie": "a=1"}), 3)
    assert json.loads(own.body)["cookie"] == "a=1"


def self_signed() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and its key, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[_Server, bytes]]:
    """The echo server over https, with a self-signed certificate (returned too)."""
    cert, key = self_signed()
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    httpd = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=True)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.hits = []
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, name="egress-test-tls", daemon=True)
    thread.start()
    yield httpd, cert
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


async def test_https_certificates_are_verified_with_the_gateways_context(perform, tls_server):
    httpd, cert = tls_server
    url = f"https://127.0.0.1:{httpd.server_address[1]}/echo"
    async with opened(gateway_for(httpd)) as untrusting:
        refused = await perform(untrusting, TENANT, get(url), 3.0)
    assert (refused.error or "").startswith("TLS certificate verification failed: "), refused
    trusting_context = ssl.create_default_context(cadata=cert.decode())
    async with opened(gateway_for(httpd, ssl_context=trusting_context)) as trusting:
        answer = await perform(trusting, TENANT, get(url), 3.0)
    assert answer.status == 200, answer
    assert json.loads(answer.body)["authorization"] == "<redacted>"
    assert httpd.hits[-1] == ("/echo", SECRET)


# -- `call` only: many calls in flight on one event loop ---------------------------------------


class _LoopServer:
    """An HTTP server on the test's event loop: answers after 200 ms (`/hang`: once released),
    counting the requests it holds at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                if head.split(b" ")[1] == b"/hang":
                    await self.release.wait()
                else:
                    await asyncio.sleep(0.2)
            finally:
                self.in_flight -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def loop_server() -> AsyncIterator[_LoopServer]:
    answering = _LoopServer()
    server = await asyncio.start_server(answering.handle, "127.0.0.1", 0, backlog=512)
    answering.port = server.sockets[0].getsockname()[1]
    yield answering
    answering.release.set()
    server.close()
    await server.wait_closed()


async def test_two_hundred_calls_are_in_flight_at_once(server, loop_server):
    url = f"http://127.0.0.1:{loop_server.port}/delay"
    async with opened(gateway_for(server, loop_server.port)) as gateway:
        answers = await asyncio.gather(*(gateway.call(TENANT, get(url), 10.0) for _ in range(200)))
    assert [(answer.status, answer.body) for answer in answers] == [(200, "ok")] * 200
    assert loop_server.most_in_flight >= 100


async def test_a_hung_server_does_not_hold_up_other_calls(server, loop_server):
    base_url = f"http://127.0.0.1:{loop_server.port}"
    async with opened(gateway_for(server, loop_server.port, max_connections=4)) as gateway:
        hung = asyncio.create_task(gateway.call(TENANT, get(base_url + "/hang"), 10.0))
        others = await asyncio.gather(
            *(gateway.call(TENANT, get(base_url + "/delay"), 10.0) for _ in range(6))
        )
        assert [answer.status for answer in others] == [200] * 6
        assert not hung.done()
        loop_server.release.set()
        assert (await hung).status == 200


class _WireServer:
    """An HTTP/1.1 server on the test's event loop that keeps each request's bytes as received
    and answers `ok`, keeping the connection open; `/drop` is read, then the connection is
    closed without an answer; `/head-with-body` is answered with a body, in one write, on a
    closing connection."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.received.append(head + await reader.readexactly(length))
                path = head.split(b" ")[1]
                if path == b"/drop":
                    break
                if path == b"/head-with-body":
                    writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc")
                    await writer.drain()
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def heads(self) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
        """Each request's line, headers (names lower-cased) and body."""
        parsed = []
        for data in self.received:
            head, _, body = data.partition(b"\r\n\r\n")
            line, *fields = head.split(b"\r\n")
            headers = {}
            for field_line in fields:
                name, _, value = field_line.partition(b":")
                headers[name.lower()] = value.strip()
            parsed.append((line, headers, body))
        return parsed


@pytest.fixture
async def wire_server() -> AsyncIterator[_WireServer]:
    wire = _WireServer()
    server = await asyncio.start_server(wire.handle, "127.0.0.1", 0)
    wire.port = server.sockets[0].getsockname()[1]
    yield wire
    server.close()
    await server.wait_closed()


async def test_only_the_plans_headers_go_on_the_wire(server, wire_server):
    """Host, Content-Length (with a body), Accept-Encoding and User-Agent, and the guest's:
    nothing else; the path as written; a Latin-1 value as its bytes."""
    url = f"http://127.0.0.1:{wire_server.port}"
    async with opened(gateway_for(server, wire_server.port)) as gateway:
        answers = [
            await gateway.call(TENANT, get(url + "/a/./b/../c?x=%41"), 3.0),
            await gateway.call(
                TENANT,
                get(url + "/post", method="POST", headers={"X-Guest": "caf\xc3\xa9"}, body="hi"),
                3.0,
            ),
            await gateway.call(TENANT, get(url + "/gone", method="DELETE"), 3.0),
            await gateway.call(
                TENANT, get(url + "/own", headers={"Accept-Encoding": "gzip", "User-Agent": "g"}), 3
            ),
        ]
    assert [(answer.status, answer.body) for answer in answers] == [(200, "ok")] * 4
    host = f"127.0.0.1:{wire_server.port}".encode()
    common = {b"host": host, b"accept-encoding": b"identity", b"user-agent": b"stepfleet-egress"}
    assert wire_server.heads() == [
        (b"GET /a/./b/../c?x=%41 HTTP/1.1", common, b""),
        (
            b"POST /post HTTP/1.1",
            {**common, b"x-guest": b"caf\xc3\xa9", b"content-length": b"2"},
            b"hi",
        ),
        (b"DELETE /gone HTTP/1.1", common, b""),
        (b"GET /own HTTP/1.1", {**common, b"accept-encoding": b"gzip", b"user-agent": b"g"}, b""),
    ]


async def test_a_request_is_never_sent_twice(server, wire_server):
    """A kept-alive connection closed without an answer is the answer, even for a PUT."""
    url = f"http://127.0.0.1:{wire_server.port}"
    async with opened(gateway_for(server, wire_server.port)) as gateway:
        first = await gateway.call(TENANT, get(url + "/first"), 3.0)
        dropped = await gateway.call(TENANT, get(url + "/drop", method="PUT", body="x"), 3.0)
    assert first.status == 200
    assert dropped.error == "invalid HTTP response (RemoteDisconnected)"
    assert [line for line, _, _ in wire_server.heads()] == [
        b"GET /first HTTP/1.1",
        b"PUT /drop HTTP/1.1",
    ]


async def test_a_header_value_goes_out_utf8_encoded(server, wire_server):
    """As docs/guest-abi.md says: header values are sent as UTF-8."""
    url = f"http://127.0.0.1:{wire_server.port}/latin"
    async with opened(gateway_for(server, wire_server.port)) as gateway:
        answer = await gateway.call(TENANT, get(url, headers={"X-Guest": "caf\xe9"}), 3.0)
    assert answer.status == 200
    assert wire_server.heads()[0][1][b"x-guest"] == "caf\xe9".encode()


async def test_a_header_value_with_a_control_character_is_not_sent(server, wire_server):
    url = f"http://127.0.0.1:{wire_server.port}/control"
    async with opened(gateway_for(server, wire_server.port)) as gateway:
        answer = await gateway.call(TENANT, get(url, headers={"X-Guest": "a\x01b"}), 3.0)
    assert (answer.status, answer.error) == (
        0,
        "request failed (control character in a header value)",
    )
    assert wire_server.heads() == []


async def test_a_body_sent_with_the_answer_to_head_is_an_invalid_response(server, wire_server):
    """HTTP forbids a body in the answer to HEAD; a server that sends one gets an error, not
    a guess at where its answer ends."""
    url = f"http://127.0.0.1:{wire_server.port}/head-with-body"
    async with opened(gateway_for(server, wire_server.port)) as gateway:
        answer = await gateway.call(TENANT, get(url, method="HEAD"), 3.0)
    assert answer.status == 0
    assert answer.error == "invalid HTTP response (RemoteProtocolError)"


# -- the gateway on its own ------------------------------------------------------------------


async def test_configure_leaves_out_invalid_entries_and_secrets_without_printing_values():
    gateway = EgressGateway()
    try:
        problems = gateway.configure(
            {TENANT: {"ok.example.com", "http://bad.example.com", "127.1"}},
            [
                (TENANT, "ok.example.com", "Host", "value-1"),
                (TENANT, "ok.example.com", "X-Key", "two\nlines-value"),
            ],
        )
    finally:
        await gateway.aclose()
    assert len(problems) == 4
    assert not any("value-1" in p or "lines-value" in p for p in problems)


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("API.Example.COM", "api.example.com"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]:8443", "[::1]:8443"),
        (" localhost ", "localhost"),
    ],
)
async def test_host_entries_are_canonical(entry, canonical):
    assert normalize_host_entry(entry) == canonical


@pytest.mark.parametrize(
    "entry",
    [
        "http://api.example.com",
        "api.example.com/path",
        "user@api.example.com",
        "api.example.com.",
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "127.000.0.1",
        "::1",
        "[0:0::1]",
        "api.example.com:0",
        "api.example.com:080",
        "api.example.com:99999",
        "exa mple.com",
        "",
    ],
)
async def test_host_entries_that_are_refused(entry):
    with pytest.raises(HostError):
        normalize_host_entry(entry)


async def test_urls_point_where_they_say():
    target = parse_url("HTTPS://Api.Example.com/v1/x?a=b#frag")
    assert (target.scheme, target.host, target.port, target.path) == (
        "https",
        "api.example.com",
        443,
        "/v1/x?a=b",
    )
    assert parse_url("http://[::1]:8080").connect_host == "::1"
    for url in ("http://a.example\\@b.example/", "http://a.example/ x", "javascript:alert(1)"):
        with pytest.raises(HostError):
            parse_url(url)


# -- secrets at rest -------------------------------------------------------------------------


async def test_seal_and_open_round_trip_and_a_wrong_key_fails():
    key = new_key()
    sealed = seal(key, "sk_live_123 ü")
    assert b"sk_live_123" not in sealed
    assert open_sealed(key, sealed) == "sk_live_123 ü"
    with pytest.raises(SealError, match="wrong key"):
        open_sealed(new_key(), sealed)
    tampered = bytearray(sealed)
    tampered[-5] ^= 1
    with pytest.raises(SealError):
        open_sealed(key, bytes(tampered))
    with pytest.raises(SealError, match="not a Fernet key"):
        seal("not-a-key", "x")


async def test_key_rotation_opens_with_any_key_and_seals_with_the_first():
    old, new = new_key(), new_key()
    sealed_old = seal(old, "value")
    assert open_sealed(f"{new},{old}", sealed_old) == "value"
    assert open_sealed(new, seal(f"{new},{old}", "value")) == "value"


async def test_a_sealed_secret_only_opens_where_it_was_sealed_for():
    key = new_key()
    ciphertext = seal_secret(key, TENANT, "stripe", "api.stripe.com", "Authorization", SECRET)
    stored = StoredSecret(TENANT, "stripe", "api.stripe.com", "Authorization", ciphertext)
    assert open_secret(key, stored) == SECRET
    moved = StoredSecret(TENANT, "stripe", "evil.example.com", "Authorization", ciphertext)
    other_tenant = StoredSecret("globex", "stripe", "api.stripe.com", "Authorization", ciphertext)
    opened, problems = open_secrets(key, [stored, moved, other_tenant])
    assert opened == [(TENANT, "api.stripe.com", "Authorization", SECRET)]
    assert len(problems) == 2
    assert all("sealed for another" in p and SECRET not in p for p in problems)
    with pytest.raises(SealError):
        open_secrets("bad key", [stored])
