"""Readiness and liveness read the worker's health file differently, and `stepfleet drain`
stops the worker it names and waits for its drain (a pre-stop hook), here on stand-in
processes that write the file as a worker does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stepfleet.cli.main import app
from stepfleet.workers.health import Health, judge, judge_alive, write

NOW = 1_000_000.0


def health_at(path: Path, *, state: str, at: float, store: float, broker: float) -> None:
    record = Health(pid=1, name="w1", state=state, store_ok_at=store, broker_ok_at=broker)
    path.write_text(json.dumps({**asdict(record), "at": at}))


def test_a_ready_worker_that_reaches_its_services_is_ready_and_alive(tmp_path: Path) -> None:
    """Fresh file, state ready, both services reached lately: both judgements pass."""
    path = tmp_path / "h"
    health_at(path, state="ready", at=NOW - 1, store=NOW - 1, broker=NOW - 1)
    assert judge(path, max_age=15, now=NOW)[0]
    assert judge_alive(path, max_age=60, now=NOW)[0]


def test_a_worker_without_postgresql_is_alive_but_not_ready(tmp_path: Path) -> None:
    """It still rewrites its file while PostgreSQL is away: not ready, but not to be killed."""
    path = tmp_path / "h"
    health_at(path, state="ready", at=NOW - 1, store=NOW - 300, broker=NOW - 1)
    ready, why = judge(path, max_age=15, now=NOW)
    assert not ready
    assert "PostgreSQL" in why
    alive, why = judge_alive(path, max_age=60, now=NOW)
    assert alive, why


def test_a_draining_worker_is_alive_but_not_ready(tmp_path: Path) -> None:
    """While it drains (`stopping`) it takes no new work but must not be restarted."""
    path = tmp_path / "h"
    health_at(path, state="stopping", at=NOW - 1, store=NOW - 1, broker=NOW - 1)
    assert not judge(path, max_age=15, now=NOW)[0]
    alive, why = judge_alive(path, max_age=60, now=NOW)
    assert alive
    assert "stopping" in why


@pytest.mark.parametrize(
    ("state", "at", "reason"),
    [("ready", NOW - 120, "last reported 120s ago"), ("stopped", NOW - 1, "has stopped")],
)
def test_a_silent_or_stopped_worker_is_not_alive(
    tmp_path: Path, state: str, at: float, reason: str
) -> None:
    """A file not rewritten within --max-age (a hung loop), or a stopped worker, fails."""
    path = tmp_path / "h"
    health_at(path, state=state, at=at, store=at, broker=at)
    alive, why = judge_alive(path, max_age=60, now=NOW)
    assert not alive
    assert reason in why


def test_no_file_is_neither_ready_nor_alive(tmp_path: Path) -> None:
    """A missing or garbled file fails both, saying so."""
    missing = tmp_path / "missing"
    garbled = tmp_path / "garbled"
    garbled.write_text("{not json")
    for path in (missing, garbled):
        for judgement in (judge, judge_alive):
            healthy, why = judgement(path, max_age=60)
            assert not healthy
            assert "no readable health file" in why


def test_health_live_is_the_liveness_probe(tmp_path: Path) -> None:
    """`stepfleet health --live` exits 0 where `stepfleet health` exits 1 (no PostgreSQL)."""
    path = tmp_path / "h"
    now = time.time()
    health_at(path, state="ready", at=now, store=now - 300, broker=now)
    runner = CliRunner()
    ready = runner.invoke(app, ["health", "--file", str(path)])
    alive = runner.invoke(app, ["health", "--live", "--file", str(path), "--max-age", "60"])
    assert ready.exit_code == 1
    assert alive.exit_code == 0, alive.output
    assert "alive" in alive.output


# A stand-in worker: writes its health file as the worker does, and on SIGTERM reports
# `stopping`, drains for a moment (or forever, when told to ignore it) and reports `stopped`.
STAND_IN = textwrap.dedent(
    """
    import json, os, signal, sys, time
    path, drain_seconds = sys.argv[1], float(sys.argv[2])
    def report(state):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "name": "w", "state": state, "at": time.time(),
                       "store_ok_at": time.time(), "broker_ok_at": time.time(), "steps": 7}, f)
        os.replace(tmp, path)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    report("ready")
    while not stopping:
        time.sleep(0.05)
    report("stopping")
    if drain_seconds < 0:
        while True:
            time.sleep(0.05)
    time.sleep(drain_seconds)
    report("stopped")
    """
)


def stand_in(path: Path, drain_seconds: float) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(path), str(drain_seconds)])
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, "the stand-in wrote no health file"
        time.sleep(0.05)
    return process


def test_drain_returns_once_the_worker_has_drained(tmp_path: Path) -> None:
    """`stepfleet drain` sends SIGTERM to the pid in the file and exits 0 after `stopped`."""
    path = tmp_path / "h"
    process = stand_in(path, drain_seconds=0.5)
    try:
        result = CliRunner().invoke(app, ["drain", "--file", str(path), "--timeout", "30"])
        assert result.exit_code == 0, result.output
        assert "drained and stopped after 7 steps" in result.output
        assert json.loads(path.read_text())["state"] == "stopped"
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_drain_fails_when_the_worker_is_still_draining_at_its_timeout(tmp_path: Path) -> None:
    """A worker that does not finish in time makes the hook fail, saying so."""
    path = tmp_path / "h"
    process = stand_in(path, drain_seconds=-1)
    try:
        result = CliRunner().invoke(app, ["drain", "--file", str(path), "--timeout", "0.5"])
        assert result.exit_code == 1
        assert "still draining after 0.5s" in result.output
        assert json.loads(path.read_text())["state"] == "stopping"
    finally:
        process.kill()
        process.wait()


def test_drain_of_a_stopped_or_gone_worker_succeeds(tmp_path: Path) -> None:
    """Nothing to drain: a file saying `stopped`, or naming a process that is gone."""
    path = tmp_path / "h"
    write(path, Health(pid=os.getpid(), name="w", state="stopped"))
    result = CliRunner().invoke(app, ["drain", "--file", str(path)])
    assert result.exit_code == 0
    assert "already stopped" in result.output
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write(path, Health(pid=gone.pid, name="w", state="ready"))
    result = CliRunner().invoke(app, ["drain", "--file", str(path)])
    assert result.exit_code == 0
    assert "is not running" in result.output


def test_drain_without_a_health_file_fails(tmp_path: Path) -> None:
    """No file: no worker to ask, exit 1 with the path."""
    result = CliRunner().invoke(app, ["drain", "--file", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no worker to drain" in result.output
