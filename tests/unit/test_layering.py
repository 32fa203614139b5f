"""The package's rooms keep their import rules (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "stepfleet"

# Third-party libraries only one room may import.
OWNED = {
    "aio_pika": "broker",
    "aiormq": "broker",
    "wasmtime": "sandbox",
    "sqlalchemy": "store",
    "psycopg": "store",
    "alembic": "store",
    "cryptography": "egress",
    "aiohttp": "egress",
    "yarl": "egress",
    "prometheus_client": "observe",
    "opentelemetry": "observe",
    "fastapi": "api",
    "starlette": "api",
    "uvicorn": "api",
    "jinja2": "api",
}
# Which of our rooms each room may import.
MAY_IMPORT = {
    "schemas": set(),
    "engine": {"schemas"},
    "sandbox": {"schemas"},
    "store": {"schemas"},
    "broker": {"schemas"},
    # The egress gateway: stdlib, `cryptography`, `aiohttp` and the shared types, nothing else
    # of ours.
    "egress": {"schemas"},
    # Metrics and traces: prometheus-client and OpenTelemetry behind a port of plain values.
    "observe": {"schemas"},
    "client": {"schemas", "broker"},
    # The step cycle and the messages it and operator actions queue.
    "cycle": {"schemas", "engine", "sandbox", "store", "broker", "observe"},
    "workers": {"schemas", "engine", "sandbox", "store", "broker", "egress", "cycle", "observe"},
    # Operator actions; egress to check and seal tenants' secrets.
    "control": {"schemas", "engine", "sandbox", "store", "broker", "cycle", "egress"},
    # The HTTP API and console: reads through the store, actions through control, worker
    # health files and settings from workers, host checks from egress.
    "api": {"schemas", "store", "broker", "control", "workers", "egress"},
    "cli": {
        "schemas",
        "engine",
        "sandbox",
        "store",
        "broker",
        "workers",
        "cycle",
        "client",
        "control",
        "egress",
        "observe",
        "api",
    },
}
# engine is pure: no I/O modules at all.
ENGINE_FORBIDDEN = {"asyncio", "socket", "os", "subprocess", "structlog", "pathlib", "time"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def room_files() -> list[tuple[str, Path]]:
    return [
        (path.relative_to(PACKAGE).parts[0], path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if len(path.relative_to(PACKAGE).parts) > 1
    ]


@pytest.mark.parametrize(("room", "path"), room_files(), ids=lambda v: str(v))
def test_room_imports(room: str, path: Path) -> None:
    """Each module imports only the rooms and libraries its room may use."""
    for name in imports(path):
        top = name.split(".")[0]
        if top in OWNED:
            assert OWNED[top] == room, f"{path.name} ({room}) imports {name}, owned by {OWNED[top]}"
        if top == "stepfleet" and "." in name:
            other = name.split(".")[1]
            if other != room and other in MAY_IMPORT:
                assert other in MAY_IMPORT[room], (
                    f"{path.name} ({room}) may not import stepfleet.{other}"
                )
        if room == "engine":
            assert top not in ENGINE_FORBIDDEN, (
                f"engine/{path.name} imports {name}: the engine does no I/O"
            )
