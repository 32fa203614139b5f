"""The CLI imports each command's libraries when the command runs, so start-up stays quick.

Each case runs in a fresh interpreter and reports which heavy libraries ended up loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("sqlalchemy", "aio_pika", "aiormq", "wasmtime", "aiohttp", "cryptography", "alembic")


def loaded(code: str, watched: tuple[str, ...] = HEAVY, **env: str) -> set[str]:
    """The libraries among `watched` loaded after running `code` in a new interpreter."""
    report = f"\nimport json, sys\nprint(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", code + report],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=120,
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_service_library():
    """`import stepfleet.cli.main` loads none of SQLAlchemy, aio-pika, wasmtime, aiohttp,
    cryptography."""
    assert loaded("import stepfleet.cli.main") == set()


@pytest.mark.parametrize(
    "args",
    [["--help"], ["status", "--help"], ["dlq", "list", "--help"], ["tenant", "--help"]],
    ids=lambda a: " ".join(a),
)
def test_help_loads_no_service_library(args):
    """Printing help imports no library a command would need to run."""
    code = (
        "from stepfleet.cli.main import app\n"
        "try:\n"
        f"    app({args!r}, prog_name='stepfleet')\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    assert loaded(code) == set()


# What `status` may load beyond the CLI itself: psycopg, and nothing that takes long to
# import (the database here refuses connections, which status reports as one line).
STATUS_WATCHED = (*HEAVY, "psycopg", "pydantic", "pydantic_settings", "structlog")
REFUSED = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"


def status_call(*args: str) -> str:
    """Code that runs the `stepfleet` script's entry point as `stepfleet ARGS`."""
    return (
        "import sys\n"
        f"sys.argv = ['stepfleet', *{args!r}]\n"
        "from stepfleet.cli.main import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("status", "nope"),
        ("status", "nope", "--tenant", "acme"),
        ("status", "--json", "--tenant", "acme", "nope"),
    ],
    ids=" ".join,
)
def test_status_reads_through_psycopg_alone(args):
    """A plain `status` call reads PostgreSQL through psycopg: no SQLAlchemy, no aio-pika, no
    wasmtime, and neither pydantic (settings, typer's coercion) nor structlog."""
    assert loaded(status_call(*args), STATUS_WATCHED, STEPFLEET_DATABASE_URL=REFUSED) == {"psycopg"}


def test_status_parsed_by_typer_still_leaves_sqlalchemy_out():
    """A call typer parses (here `--tenant=acme`) reads the same way, with pydantic for
    typer's coercion."""
    call = status_call("status", "nope", "--tenant=acme")
    assert loaded(call, STATUS_WATCHED, STEPFLEET_DATABASE_URL=REFUSED) == {"psycopg", "pydantic"}


def test_status_with_another_driver_goes_through_the_store():
    """A database URL in another form than `postgresql+psycopg://` (here SQLAlchemy's name
    of psycopg's async driver) is read through the store, that is by SQLAlchemy."""
    other = "postgresql+psycopg_async://postgres@127.0.0.1:1/nothing"
    assert "sqlalchemy" in loaded(
        status_call("status", "nope"), STATUS_WATCHED, STEPFLEET_DATABASE_URL=other
    )
