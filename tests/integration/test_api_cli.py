"""`stepfleet token` and `stepfleet api` as a person runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from typer.testing import CliRunner

from stepfleet.cli.main import app

pytestmark = pytest.mark.services


@pytest.fixture
def env(settings) -> dict[str, str]:
    return {
        "STEPFLEET_DATABASE_URL": settings.database_url,
        "STEPFLEET_AMQP_URL": settings.amqp_url,
        "STEPFLEET_PREFIX": settings.prefix,
        "STEPFLEET_OPERATOR": "oncall-grace",
        "STEPFLEET_HEALTH_FILE": "",
    }


async def test_token_add_list_and_revoke(env, store):
    runner = CliRunner()

    async def invoke(*args: str):
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)

    name = f"cli-{uuid.uuid4().hex[:6]}"
    added = await invoke("token", "add", name, "--role", "operator", "--tenant", "acme")
    assert added.exit_code == 0, added.output
    secret = added.stdout.strip().splitlines()[0]
    assert secret.startswith("sft_")
    assert len(secret) == 47
    listed = await invoke("token", "list")
    [line] = [row for row in listed.stdout.splitlines() if row.startswith(name)]
    assert "operator" in line
    assert "acme" in line
    assert "live" in line
    assert secret not in listed.stdout
    again = await invoke("token", "add", name, "--role", "viewer")
    assert again.exit_code == 1
    assert "exists" in again.output
    bad = await invoke("token", "add", "x y", "--role", "viewer")
    assert bad.exit_code == 1
    role = await invoke("token", "add", f"r-{name}", "--role", "root")
    assert role.exit_code == 1
    assert "not a role" in role.output
    revoked = await invoke("token", "revoke", name)
    assert revoked.exit_code == 0, revoked.output
    assert (await invoke("token", "revoke", name)).exit_code == 1
    entries = await store.dead_letters.audit_entries(limit=100)
    assert {(e.actor, e.action) for e in entries if e.target == name} == {
        ("oncall-grace", "token-add"),
        ("oncall-grace", "token-revoke"),
    }


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 (loopback)
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_stepfleet_api_serves_until_sigterm(env):
    """`stepfleet api` answers the probes on STEPFLEET_API_PORT; SIGTERM stops it cleanly
    (uvicorn finishes, then ends by the signal it got, as a supervisor expects)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(  # noqa: ASYNC220 (started once, waited for in a thread)
        [sys.executable, "-m", "stepfleet", "api"],
        env={**os.environ, **env, "STEPFLEET_API_PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
                break
            except (urllib.error.URLError, OSError):
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "stepfleet api did not start"
                await asyncio.sleep(0.1)
        assert status == 200
        assert b'"ok":true' in body
        status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz")
        assert status == 200
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/api/v1/instances")
        assert status == 401
        assert b'"error":"unauthorized"' in body
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
        output = process.stdout.read().decode() if process.stdout else ""
        if process.stdout:
            process.stdout.close()
    assert code in (0, -signal.SIGTERM), output
    assert "Finished server process" in output
