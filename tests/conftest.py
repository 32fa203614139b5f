"""Fixtures shared by every tier: paths to the example and hostile modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog
from structlog.contextvars import merge_contextvars
from structlog.typing import EventDict

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "guest" / "examples"
HOSTILE = ROOT / "guest" / "hostile"

# The C example's documented run (guest/examples/order/README.md).
ORDER_PARAMS = {"order_id": "A-1", "amount": 4200, "items": 3}
ORDER_OUTPUT = {
    "order": "A-1",
    "reservation": "RSV-A-1",
    "items": 3,
    "charged": 4200,
    "tracking": "TRK-A-1-A7237DDA",
}


@pytest.fixture(scope="session")
def order_wasm() -> bytes:
    """The C example: reserve, charge, ship."""
    return (EXAMPLES / "order" / "order.wasm").read_bytes()


@pytest.fixture(scope="session")
def greeter_wasm() -> bytes:
    """The AssemblyScript example: lookup, compose, deliver."""
    return (EXAMPLES / "greeter" / "greeter.wasm").read_bytes()


def hostile_wasm(name: str) -> bytes:
    """Compile one of the hostile WAT modules."""
    import wasmtime

    return wasmtime.wat2wasm((HOSTILE / f"{name}.wat").read_text())


@pytest.fixture(scope="session")
def playbook_wasm() -> bytes:
    """The C test workflow that runs whatever primitives its params list."""
    return (EXAMPLES / "playbook" / "playbook.wasm").read_bytes()


@pytest.fixture(scope="session")
def reminder_wasm() -> bytes:
    """The AssemblyScript example with now, random, sleep, an event wait and a rollback."""
    return (EXAMPLES / "reminder" / "reminder.wasm").read_bytes()


@contextmanager
def capture_logs() -> Iterator[list[EventDict]]:
    """Capture structlog events as the worker logs them: with the context bound by
    contextvars (tenant, instance, module digest, step, attempt) merged in."""
    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
        yield logs
