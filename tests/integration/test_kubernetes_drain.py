"""What Kubernetes does to the fleet, without Kubernetes: a rolling replacement of workers
under load, each stopped as the kubelet stops a pod (the pre-stop hook of
deploy/kubernetes/base/worker-deployment.yaml, then SIGTERM, then SIGKILL at the end of its
terminationGracePeriodSeconds), and the init containers' wait for the migration."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from stepfleet.cli.main import app
from stepfleet.schemas import digest_of
from stepfleet.store import LetterFilter
from stepfleet.store.migrate import ensure_database, head_revision, upgrade
from stepfleet.workers.health import judge
from tests.integration.test_faults import (
    STEPS,
    publish_orders,
    spawn,
    wait_complete,
    worker_env,
)

pytestmark = pytest.mark.services

BASE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base"


def worker_manifest() -> tuple[float, list[str], float]:
    """(terminationGracePeriodSeconds, pre-stop command, STEPFLEET_SHUTDOWN_GRACE_SECONDS) as
    the base deploys them."""
    deployment = yaml.safe_load((BASE / "worker-deployment.yaml").read_text())
    spec = deployment["spec"]["template"]["spec"]
    (worker,) = [c for c in spec["containers"] if c["name"] == "worker"]
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (config,) = kustomization["configMapGenerator"]
    literals = dict(item.split("=", 1) for item in config["literals"])
    return (
        float(spec["terminationGracePeriodSeconds"]),
        worker["lifecycle"]["preStop"]["exec"]["command"],
        float(literals["STEPFLEET_SHUTDOWN_GRACE_SECONDS"]),
    )


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_ready(health: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (await asyncio.to_thread(judge, health, max_age=15))[0]:
        assert process.poll() is None, "the worker exited while starting"
        assert loop.time() < deadline, "the worker did not become ready"
        await asyncio.sleep(0.1)


async def stop_as_the_kubelet_does(
    process: subprocess.Popen[bytes],
    env: dict[str, str],
    hook: list[str],
    grace: float,
    health: Path,
) -> dict[str, Any]:
    """Run the pre-stop hook (for at most the grace period), then SIGTERM, and wait for the
    exit until the grace period ends (then the kubelet's SIGKILL, 2 s later if the hook used
    it all); return what happened, with when the worker reported each state."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    seen: dict[str, float] = {}

    async def watch() -> None:
        while True:
            state = await asyncio.to_thread(_state_of, health)
            if state is not None:
                seen.setdefault(state, round(loop.time() - started, 2))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    argv = [sys.executable, "-m", "stepfleet", *hook[1:]] if hook[0] == "stepfleet" else hook
    try:
        hook_run = await asyncio.to_thread(
            subprocess.run, argv, env=env, capture_output=True, text=True, timeout=grace
        )
        hook_exit, hook_output = hook_run.returncode, (hook_run.stdout + hook_run.stderr)
    except subprocess.TimeoutExpired as exc:
        hook_exit, hook_output = None, str(exc.stdout or "") + str(exc.stderr or "")
    hook_seconds = round(loop.time() - started, 2)
    if process.poll() is None:
        process.terminate()
    try:
        remaining = max(grace - (loop.time() - started), 2.0)
        code = await asyncio.to_thread(process.wait, remaining)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None  # the kubelet would have killed it
    exited = round(loop.time() - started, 2)
    watcher.cancel()
    return {
        "hook_exit": hook_exit,
        "hook_output": hook_output.strip()[-300:],
        "hook_seconds": hook_seconds,
        "exit": code,
        "seconds_to_exit": exited,
        "states_seen_at": seen,
    }


def _state_of(health: Path) -> str | None:
    try:
        return str(json.loads(health.read_text())["state"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.timeout(300)
async def test_a_rolling_replacement_under_load_loses_nothing(
    settings, topology, store, order_wasm, tmp_path
):
    """Two workers under a burst are replaced one by one (a new worker ready first, as
    maxUnavailable 0 asks): each old one runs the manifest's pre-stop hook, gets SIGTERM,
    exits 0 inside terminationGracePeriodSeconds and reports `stopped`; every workflow then
    completes with each step journaled once and nothing dead-lettered."""
    grace, hook, drain = worker_manifest()
    assert grace > drain
    tenant = f"roll{uuid.uuid4().hex[:8]}"
    digest = digest_of(order_wasm)
    await store.put_module(tenant, digest, order_wasm)
    log = tmp_path / "workers.log"
    started: list[tuple[subprocess.Popen[bytes], dict[str, str], Path]] = []

    async def start(index: int) -> tuple[subprocess.Popen[bytes], dict[str, str], Path]:
        health = tmp_path / f"worker-{index}.health"
        env = worker_env(
            settings,
            STEPFLEET_HEALTH_FILE=str(health),
            STEPFLEET_SHUTDOWN_GRACE_SECONDS=f"{drain:g}",
        )
        process = spawn(env, log)
        started.append((process, env, health))
        await wait_ready(health, process, 60)
        return process, env, health

    count = 2000
    try:
        old = [await start(i) for i in range(2)]
        await publish_orders(settings, topology, tenant, digest, count)
        # Under load: the burst is being worked on.
        for _ in range(300):
            if (await wait_complete(store, tenant, count, 0))["entries"] >= count // 10:
                break
            await asyncio.sleep(0.05)
        stops = []
        for index, (process, env, health) in enumerate(old):
            await start(len(old) + index)  # the surge pod, ready first
            rss = peak_rss_mib(process.pid)
            held = json.loads(health.read_text())["steps"]
            outcome = await stop_as_the_kubelet_does(process, env, hook, grace, health)
            final = json.loads(health.read_text())
            stops.append({**outcome, "steps_before": held, "steps": final["steps"], "rss_mib": rss})
            print("stop:", json.dumps(stops[-1]), flush=True)
            assert outcome["exit"] == 0, (outcome, log.read_text(errors="replace")[-3000:])
            assert outcome["hook_exit"] == 0, outcome
            assert final["state"] == "stopped"
        report = await wait_complete(store, tenant, count, 120)
    finally:
        for process, _, _ in started:
            if process.poll() is None:
                process.terminate()
        for process, _, _ in started:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    letters = await store.dead_letters.find(LetterFilter(tenant=tenant, include_replayed=True))
    print("\nrolling replacement:", json.dumps({"workflows": count, "stops": stops, **report}))
    assert report["complete"] == count, report
    assert report["entries"] == count * len(STEPS)
    assert report["repeated_steps"] == 0
    assert letters == []
    assert all(stop["steps"] > 0 for stop in stops), stops


def test_wait_schema_returns_at_once_when_the_schema_is_at_head(database_url):
    """`stepfleet wait-schema` on a migrated database exits 0 and names the head."""
    result = CliRunner().invoke(
        app, ["wait-schema", "--timeout", "5"], env={"STEPFLEET_DATABASE_URL": database_url}
    )
    assert result.exit_code == 0, result.output
    assert f"schema is at {head_revision()}" in result.output


async def test_wait_schema_waits_for_the_migration(database_url, run_id):
    """On an empty database it waits, and returns once another process migrated it; with no
    migration it gives up at its timeout, saying what it waited for."""
    url = (
        make_url(database_url)
        .set(database=f"stepfleet_test_{run_id}_wait")
        .render_as_string(hide_password=False)
    )
    ensure_database(url)
    env = {"STEPFLEET_DATABASE_URL": url}
    runner = CliRunner()
    try:
        await wait_while_migrating(runner, env, url)
    finally:
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(
                text(f'DROP DATABASE IF EXISTS "stepfleet_test_{run_id}_wait" WITH (FORCE)')
            )
        admin.dispose()


async def wait_while_migrating(runner: CliRunner, env: dict[str, str], url: str) -> None:
    gave_up = await asyncio.to_thread(
        runner.invoke, app, ["wait-schema", "--timeout", "0.5", "--interval", "0.2"], env=env
    )
    assert gave_up.exit_code == 1
    assert f"waiting for {head_revision()}" in gave_up.output
    waiting = asyncio.create_task(
        asyncio.to_thread(
            runner.invoke, app, ["wait-schema", "--timeout", "120", "--interval", "0.2"], env=env
        )
    )
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await asyncio.to_thread(upgrade, url)
    result = await asyncio.wait_for(waiting, 120)
    assert result.exit_code == 0, result.output
    assert f"schema is at {head_revision()}" in result.output
