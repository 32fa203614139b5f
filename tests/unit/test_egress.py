"""Guest HTTP egress: the real WasmSandbox and EgressGateway against a loopback HTTP server.

The playbook module's `http` op makes the calls; a local http.server (127.0.0.1, port 0) echoes
what it received, so the tests can check what reached the server (the injected secret) and what
reached the guest (the secret scrubbed).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
import wasmtime

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
    GuestCrashed,
    GuestReport,
    HttpRequest,
    InstanceKey,
    InstanceStatus,
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
                "body": body,
            }
            self._send(
                200,
                json.dumps(payload).encode(),
                {"Content-Type": "application/json", "X-Echo-Auth": echoed},
            )

    do_GET = do_POST = do_PUT = do_DELETE = _handle


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


def gateway_for(server: _Server, **options: Any) -> EgressGateway:
    gateway = EgressGateway(**options)
    entry = f"127.0.0.1:{server.server_address[1]}"
    assert gateway.configure({TENANT: {entry}}, [(TENANT, entry, "Authorization", SECRET)]) == []
    return gateway


@pytest.fixture(scope="module")
def gateway(server: _Server) -> Iterator[EgressGateway]:
    gateway = gateway_for(server, call_timeout_s=3.0, max_response_bytes=1000)
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def sandbox(gateway: EgressGateway) -> Iterator[WasmSandbox]:
    sandbox = WasmSandbox(LIMITS, egress=gateway)
    yield sandbox
    sandbox.close()


def load(sandbox: WasmSandbox, wasm: bytes) -> str:
    digest = digest_of(wasm)
    if not sandbox.is_loaded(digest):
        sandbox.load(digest, wasm)
    return digest


def run_ops(sandbox: WasmSandbox, wasm: bytes, *ops: dict[str, Any], **job: Any) -> GuestReport:
    """One run of the playbook over an empty journal."""
    digest = load(sandbox, wasm)
    params = json.dumps({"ops": list(ops)})
    buffer = encode_replay_buffer("i-1", params, ReplayJournal())
    return sandbox.run(GuestRun(digest, buffer, 0, tenant=job.pop("tenant", TENANT), **job))


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


def test_allowed_host_gets_the_secret_and_the_guest_never_sees_it(
    sandbox, playbook_wasm, server, hits
):
    """The secret replaces the guest's Authorization; every echo of it comes back scrubbed."""
    report = run_ops(
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


def test_the_recorded_journal_and_output_never_hold_the_secret(
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
            report = sandbox.run(GuestRun(digest, buffer, len(journal), tenant=TENANT))
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


def test_a_host_off_the_allow_list_is_refused_with_an_error_the_guest_gets(
    sandbox, playbook_wasm, server, hits
):
    port = server.server_address[1]
    refused = {
        f"http://localhost:{port}/echo": "not on the egress allow list",
        f"http://127.1:{port}/echo": "neither a host name nor",
        f"http://2130706433:{port}/echo": "neither a host name nor",
        f"http://0x7f.0.0.1:{port}/echo": "neither a host name nor",
        f"http://user:pw@127.0.0.1:{port}/echo": "userinfo",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/echo": "allow list",
        "http://127.0.0.1/echo": "127.0.0.1 port 80 is not on the egress allow list",
        f"ftp://127.0.0.1:{port}/": "only http and https",
        f"http://127.0.0.1%3a{port}/": "percent-encoded",
    }
    for url, message in refused.items():
        result = http_result(
            run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url})
        )
        assert set(result) == {"error"}, url
        assert message in result["error"], (url, result)
    other = http_result(
        run_ops(
            sandbox,
            playbook_wasm,
            {"op": "http", "name": "x", "url": base(server) + "/echo"},
            tenant="globex",
        )
    )
    assert "not on the egress allow list of tenant 'globex'" in other["error"]
    assert hits == []


def test_guests_may_not_set_framing_headers_or_unknown_methods(
    sandbox, playbook_wasm, server, hits
):
    for op, message in (
        ({"headers": {"Host": "evil.example"}}, "may not be set by a guest"),
        ({"headers": {"Transfer-Encoding": "chunked"}}, "may not be set by a guest"),
        ({"headers": {"X-Bad": "a\r\nInjected: 1"}}, "line breaks"),
        ({"method": "CONNECT"}, "method 'CONNECT' is not allowed"),
    ):
        result = http_result(
            run_ops(
                sandbox,
                playbook_wasm,
                {"op": "http", "name": "x", "url": base(server) + "/echo", **op},
            )
        )
        assert message in result.get("error", ""), (op, result)
    assert hits == []


def test_the_call_cap_per_step_is_enforced(sandbox, playbook_wasm, server, hits):
    """The default cap (10), and a run's own cap, count every call of one step."""
    url = base(server) + "/echo"
    ok = http_result(
        run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url, "repeat": 10})
    )
    assert ok["status"] == 200
    assert len(hits) == 10
    hits.clear()
    over = http_result(
        run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url, "repeat": 11})
    )
    assert over == {"error": "host call limit reached: a step may make 10 HTTP call(s)"}
    assert len(hits) == 10
    hits.clear()
    capped = http_result(
        run_ops(
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
        run_ops(
            sandbox, playbook_wasm, {"op": "http", "name": "x", "url": url}, host_calls_per_step=0
        )
    )
    assert "a step may make 0 HTTP call(s)" in none["error"]
    assert hits == []


def test_a_slow_server_hits_the_gateway_timeout(playbook_wasm, server, hits):
    gateway = gateway_for(server, call_timeout_s=0.3)
    sandbox = WasmSandbox(LIMITS, egress=gateway)
    try:
        result = http_result(
            run_ops(
                sandbox, playbook_wasm, {"op": "http", "name": "x", "url": base(server) + "/slow"}
            )
        )
    finally:
        sandbox.close()
        gateway.close()
    # The server answers only after 5 s (or when released): an error means the gateway gave
    # up first, at its own 0.3 s (socket timeout or deadline, whichever noticed).
    assert result["error"] in ("timed out", "timed out after 0.3 s")
    assert [path for path, _ in hits] == ["/slow"]


def test_the_call_timeout_is_bounded_by_the_time_left_in_the_step(
    sandbox, playbook_wasm, server, hits
):
    """A gateway timeout of 3 s, a step timeout of 300 ms: the call gives up with the step."""
    report = run_ops(
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


def test_redirects_are_not_followed(sandbox, playbook_wasm, server, hits):
    result = http_result(
        run_ops(
            sandbox,
            playbook_wasm,
            {"op": "http", "name": "x", "url": base(server) + "/redirect", "with_headers": True},
        )
    )
    assert result["status"] == 302
    assert result["headers"]["location"].endswith("/target")
    assert [path for path, _ in hits] == ["/redirect"]


def test_a_response_body_over_the_limit_is_refused(sandbox, playbook_wasm, server, hits):
    result = http_result(
        run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", "url": base(server) + "/big"})
    )
    assert result == {"error": "response body of 5000 bytes is over the limit of 1000"}


def test_without_a_gateway_every_call_fails(playbook_wasm, server, hits):
    sandbox = WasmSandbox(LIMITS)
    try:
        result = http_result(
            run_ops(
                sandbox, playbook_wasm, {"op": "http", "name": "x", "url": base(server) + "/echo"}
            )
        )
    finally:
        sandbox.close()
    assert result == {"error": "egress is not configured"}
    assert hits == []


def test_a_call_outside_a_step_is_an_abi_violation(sandbox, server, hits):
    request = json.dumps({"method": "GET", "url": base(server) + "/echo"})
    wasm = wat_module(f"(drop (call $http (i32.const 64) (i32.const {len(request)})))", request)
    report = sandbox.run(
        GuestRun(
            load(sandbox, wasm), encode_replay_buffer("i-1", "{}", ReplayJournal()), tenant=TENANT
        )
    )
    assert isinstance(report.outcome, GuestCrashed)
    assert "http_request called outside a step" in report.outcome.message
    assert hits == []


def test_a_malformed_request_is_an_abi_violation(sandbox, server, hits):
    request = '{"method":"GET","url":' + json.dumps(base(server)) + ',"headers":{"a":1}}'
    body = (
        "(drop (call $begin (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 0) (i32.const 0)))"
        f"(drop (call $http (i32.const 64) (i32.const {len(request)})))"
    )
    report = sandbox.run(
        GuestRun(
            load(sandbox, wat_module(body, request)),
            encode_replay_buffer("i-1", "{}", ReplayJournal()),
            tenant=TENANT,
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
def test_the_playbook_checks_its_http_ops_first(sandbox, playbook_wasm, op, message):
    report = run_ops(sandbox, playbook_wasm, {"op": "http", "name": "x", **op})
    assert isinstance(report.outcome, WorkflowFailed)
    assert report.outcome.message == message


# -- the gateway on its own ------------------------------------------------------------------


def test_secrets_are_only_sent_over_https_to_hosts_off_the_loopback():
    gateway = EgressGateway()
    try:
        gateway.configure(
            {TENANT: {"api.example.com"}}, [(TENANT, "api.example.com", "X-Api-Key", "k" * 20)]
        )
        answer = gateway.request(TENANT, HttpRequest("GET", "http://api.example.com/"), 1.0)
    finally:
        gateway.close()
    assert answer.error == "a secret is configured for api.example.com: it is only sent over https"


def test_configure_leaves_out_invalid_entries_and_secrets_without_printing_values():
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
        gateway.close()
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
def test_host_entries_are_canonical(entry, canonical):
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
def test_host_entries_that_are_refused(entry):
    with pytest.raises(HostError):
        normalize_host_entry(entry)


def test_urls_point_where_they_say():
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


def test_seal_and_open_round_trip_and_a_wrong_key_fails():
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


def test_key_rotation_opens_with_any_key_and_seals_with_the_first():
    old, new = new_key(), new_key()
    sealed_old = seal(old, "value")
    assert open_sealed(f"{new},{old}", sealed_old) == "value"
    assert open_sealed(new, seal(f"{new},{old}", "value")) == "value"


def test_a_sealed_secret_only_opens_where_it_was_sealed_for():
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
