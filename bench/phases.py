"""Where the workers' time went during a run: the phase times each worker keeps
(stepfleet/cycle/phases.py) and its CPU seconds, read from their health files.

A worker rewrites its health file every 2 s, so a snapshot waits that long first. The figures
are per delivery: milliseconds of wall time each phase took per delivery (batches are shared,
so a phase's time counts once per batch, divided over its deliveries) and CPU milliseconds
per delivery of the worker processes together.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_DIR = Path(tempfile.mkdtemp(prefix="stepfleet-bench-health-"))
_FILES: dict[int, Path] = {}
_REFRESH_SECONDS = 2.6
PHASES = ("inbox_wait", "checks", "transaction", "guest", "publish", "ack")


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A worker process that writes its health (and phase times) where `snapshot` reads."""
    path = _DIR / f"worker-{len(_FILES)}.health"
    worker = subprocess.Popen(
        [sys.executable, "-m", "stepfleet", "worker"],
        env={**env, "STEPFLEET_HEALTH_FILE": str(path)},
    )
    _FILES[worker.pid] = path
    return worker


async def snapshot(workers: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """The workers' phase times and CPU seconds, summed, as of now."""
    await asyncio.sleep(_REFRESH_SECONDS)
    total: dict[str, float] = {}
    for worker in workers:
        health = json.loads(_FILES[worker.pid].read_text())
        total["cpu_seconds"] = total.get("cpu_seconds", 0.0) + health.get("cpu_seconds", 0.0)
        for name, value in health.get("phases", {}).items():
            total[name] = total.get(name, 0.0) + value
    return total


def per_delivery(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What happened between two snapshots, per delivery."""
    deliveries = after.get("deliveries", 0) - before.get("deliveries", 0)
    batches = after.get("batches", 0) - before.get("batches", 0)
    if deliveries <= 0:
        return {}
    report = {
        "deliveries": deliveries,
        "mean_batch": round(deliveries / max(batches, 1), 1),
        "cpu_ms_per_delivery": round(
            1000 * (after["cpu_seconds"] - before["cpu_seconds"]) / deliveries, 3
        ),
    }
    for phase in PHASES:
        spent = after.get(phase, 0.0) - before.get(phase, 0.0)
        report[f"{phase}_ms"] = round(1000 * spent / deliveries, 3)
    return report


def cpus() -> int:
    return os.cpu_count() or 1
