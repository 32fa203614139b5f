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

REPORT = f"""
import json, sys
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def loaded(code: str, **env: str) -> set[str]:
    """The heavy libraries loaded after running `code` in a new interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", code + REPORT],
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


def test_status_loads_sqlalchemy_only():
    """`status` reads PostgreSQL and nothing else: no aio-pika, no wasmtime (the database
    here refuses connections, which status reports as one line)."""
    code = (
        "from stepfleet.cli.main import app\n"
        "try:\n"
        "    app(['status', 'nope', '--tenant', 'acme'], prog_name='stepfleet')\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    refused = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"
    assert loaded(code, STEPFLEET_DATABASE_URL=refused) == {"sqlalchemy"}
