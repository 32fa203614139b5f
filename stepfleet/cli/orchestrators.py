"""Commands for orchestrators' hooks: `stepfleet wait-schema` and `stepfleet drain`.

`wait-schema` is for init containers: a worker or API pod of a new release starts only once
`stepfleet migrate` (run by a separate job) brought the schema to the head its own code
expects; it applies nothing itself. `drain` is a worker's pre-stop hook: it asks the worker
named by the health file to stop (SIGTERM) and returns once the worker reports it has stopped,
so the hook lasts as long as the drain does.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from stepfleet.cli.common import fail, say, settings, shown
from stepfleet.store import StoreUnavailable
from stepfleet.store.migrate import head_revision, schema_revision

_DRAIN_POLL_SECONDS = 0.2


def wait_schema(
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait before giving up (exit 1).")
    ] = 600.0,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between two looks at the database.")
    ] = 2.0,
) -> None:
    """Wait until the database schema is at this release's head revision; apply nothing."""
    url = settings().database_url
    head = head_revision()
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = schema_revision(url)
            why = f"schema is at {current or 'nothing (empty database)'}, waiting for {head}"
        except StoreUnavailable as exc:
            current, why = None, str(exc)
        if current == head:
            say(f"schema is at {head}")
            return
        if time.monotonic() >= deadline:
            fail(f"gave up after {timeout:g}s: {shown(why)}")
        say(shown(why), err=True)
        time.sleep(interval)


def _state(path: Path) -> tuple[int, str, int] | None:
    """(pid, state, steps) from a health file, or None when it cannot be read."""
    try:
        data = json.loads(path.read_text())
        return int(data["pid"]), str(data["state"]), int(data.get("steps", 0))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def drain(
    file: Annotated[
        Path | None, typer.Option(help="Health file (default: STEPFLEET_HEALTH_FILE).")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0, help="Seconds to wait (default: STEPFLEET_SHUTDOWN_GRACE_SECONDS plus 5)."
        ),
    ] = None,
) -> None:
    """Stop the worker named by the health file (SIGTERM) and wait until it has drained.

    For a worker's pre-stop hook: exits 0 once the worker wrote `stopped` (or is gone), 1 if
    it is still draining after the timeout or there is no worker to ask.
    """
    config = settings()
    path = file or config.health_file
    if path is None:
        fail("no health file: set STEPFLEET_HEALTH_FILE or pass --file")
    wait = config.shutdown_grace_seconds + 5 if timeout is None else timeout
    found = _state(path)
    if found is None:
        fail(f"no readable health file at {shown(path)}: no worker to drain")
    pid, state, steps = found
    if state == "stopped":
        say(f"worker (pid {pid}) had already stopped after {steps} steps")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        say(f"worker (pid {pid}) is not running")
        return
    except PermissionError:
        fail(f"not allowed to signal the worker (pid {pid})")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(_DRAIN_POLL_SECONDS)
        found = _state(path)
        if found is not None and found[1] == "stopped":
            say(f"worker (pid {pid}) drained and stopped after {found[2]} steps")
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            say(f"worker (pid {pid}) has exited")
            return
        except PermissionError:
            pass  # still there, someone else's
    fail(f"worker (pid {pid}) is still draining after {wait:g}s")


def register_orchestrator_commands(app: typer.Typer) -> None:
    """Add `wait-schema` and `drain` to the `stepfleet` command."""
    app.command("wait-schema")(wait_schema)
    app.command("drain")(drain)
