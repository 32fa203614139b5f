"""Fixtures shared by every tier: paths to the example and hostile modules."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "guest" / "examples"
HOSTILE = ROOT / "guest" / "hostile"


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
