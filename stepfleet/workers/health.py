"""Worker health: a small JSON file the worker rewrites while it runs, which `stepfleet
health` (docker compose, Kubernetes exec probes) reads.

A file rather than a port: a worker serves no HTTP, and a file survives the question of which
address to bind in every deployment. It says whether the worker is ready, and when it last
reached PostgreSQL and RabbitMQ.

Two judgements read it. Readiness (`judge`): the worker is ready and reached both services
lately. Liveness (`judge_alive`): the worker's event loop still rewrites the file, whatever
the services do; a worker that lost PostgreSQL retries by itself and must not be restarted
for it, and a draining (`stopping`) worker is alive until it exits.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("stepfleet.worker")


@dataclass(slots=True)
class Health:
    """What the worker reports about itself."""

    pid: int
    name: str
    state: str = "starting"  # starting | ready | stopping | stopped
    at: float = 0.0
    store_ok_at: float = 0.0
    broker_ok_at: float = 0.0
    steps: int = 0
    cpu_seconds: float = 0.0
    """CPU time of the process so far (all threads)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Where its time went (stepfleet/cycle/phases.py): summed seconds and counts."""


def write(path: Path, health: Health) -> None:
    """Replace the file atomically, so a reader never sees half of it."""
    health.at = time.time()
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(asdict(health)))
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("health_file_not_written", path=str(path), error=str(exc))


def judge(path: Path, *, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """Read a health file: (healthy, one line saying why)."""
    try:
        data = json.loads(path.read_text())
        health = Health(**data)
    except (OSError, ValueError, TypeError) as exc:
        return False, f"no readable health file at {path}: {exc}"
    now = time.time() if now is None else now
    age = now - health.at
    if health.state != "ready":
        return False, f"worker {health.name} (pid {health.pid}) is {health.state}"
    if age > max_age:
        return False, f"worker {health.name} last reported {age:.0f}s ago"
    for service, seen in (("PostgreSQL", health.store_ok_at), ("RabbitMQ", health.broker_ok_at)):
        if now - seen > max_age:
            return False, f"worker {health.name} has not reached {service} for {now - seen:.0f}s"
    return True, f"worker {health.name} (pid {health.pid}) ready, {health.steps} steps"


def judge_alive(path: Path, *, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """Read a health file for liveness: (alive, one line saying why).

    Alive while the file is rewritten (every 2 s, by a task of its own on the worker's event
    loop) and the worker is not `stopped`; whether PostgreSQL or RabbitMQ answer is not asked.
    """
    try:
        data = json.loads(path.read_text())
        health = Health(**data)
    except (OSError, ValueError, TypeError) as exc:
        return False, f"no readable health file at {path}: {exc}"
    now = time.time() if now is None else now
    age = now - health.at
    if health.state == "stopped":
        return False, f"worker {health.name} (pid {health.pid}) has stopped"
    if age > max_age:
        return False, f"worker {health.name} last reported {age:.0f}s ago"
    return True, f"worker {health.name} (pid {health.pid}) alive, {health.state}, {age:.0f}s ago"
