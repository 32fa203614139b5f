"""CLI start-up: how long `stepfleet` takes, per command, from exec to exit.

Each case runs in a new interpreter --repeat times; prints the median, the 95th percentile
and the fastest, in milliseconds, with the load average before and after, as JSON. The
commands run as `python -m stepfleet ...`. The `status` cases read a real instance (a
completed one with a 12-entry journal and a failed attempt) from a database of the
benchmark's own, created, migrated and seeded first and dropped after; `status ID (no
database)` is pointed at a port where nothing listens. Needs PostgreSQL (STEPFLEET_BENCH_DATABASE_URL,
default postgresql+psycopg://postgres@127.0.0.1:5432/postgres: its server is used).

    python bench/cli_startup.py [--repeat 20]

To compare with another checkout, run it from a directory outside both with
`PYTHONPATH=/path/to/other/checkout` (the current directory would come first on the path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.schemas import (
    EntryKind,
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    digest_of,
)
from stepfleet.store import NewInstance, PgStore, StepWrite
from stepfleet.store.migrate import ensure_database, upgrade

BASE_DB = os.environ.get(
    "STEPFLEET_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
NOWHERE = "postgresql+psycopg://postgres@127.0.0.1:1/x"
TENANT = "acme"
INSTANCE = "order-1"
STEPFLEET = [sys.executable, "-m", "stepfleet"]


async def seed(url: str) -> None:
    """One completed instance with a journal of 12 steps, the last retried once."""
    store = PgStore(url, pool_size=1)
    wasm = b"\0asm\1\0\0\0cli-startup"
    digest = digest_of(wasm)
    key = InstanceKey(TENANT, INSTANCE)
    began = datetime.now(UTC)
    entries = tuple(
        JournalEntry(
            seq,
            EntryKind.STEP_SUCCEEDED,
            f"step-{seq}",
            json.dumps({"step": seq, "note": "x" * 40}),
            2 if seq == 11 else 1,
            began + timedelta(milliseconds=10 * seq),
            began + timedelta(milliseconds=10 * seq + 4),
        )
        for seq in range(12)
    )
    failed = FailedAttempt(11, "step-11", 1, "timeout", began, began + timedelta(seconds=1))
    try:
        await store.put_module(TENANT, digest, wasm)
        async with store.transaction() as tx:
            await tx.create_instances([NewInstance(key, digest, '{"order": 1}')])
        async with store.transaction() as tx:
            await tx.write_batch(
                [
                    StepWrite(
                        key,
                        InstanceStatus.COMPLETE,
                        len(entries),
                        entries,
                        output='{"shipped": true}',
                        failed_attempt=failed,
                    )
                ],
                [],
            )
    finally:
        await store.close()


@contextmanager
def seeded_database() -> Iterator[str]:
    """A migrated database holding the instance, dropped afterwards."""
    url = make_url(BASE_DB).set(database=f"stepfleet_bench_cli_{uuid.uuid4().hex[:8]}")
    url_text = url.render_as_string(hide_password=False)
    ensure_database(url_text)
    try:
        upgrade(url_text)
        asyncio.run(seed(url_text))
        yield url_text
    finally:
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        admin.dispose()


def cases(url: str) -> dict[str, tuple[list[str], str]]:
    """Each case's command and the database it is pointed at."""
    status = [*STEPFLEET, "status", INSTANCE, "--tenant", TENANT]
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], url),
        "import stepfleet.cli.main": ([sys.executable, "-c", "import stepfleet.cli.main"], url),
        "stepfleet --help": ([*STEPFLEET, "--help"], url),
        "stepfleet status --help": ([*STEPFLEET, "status", "--help"], url),
        "stepfleet status ID": (status, url),
        "stepfleet status ID --json": ([*status, "--json"], url),
        "stepfleet status ID (no database)": (status, NOWHERE),
        "import the worker's libraries": (
            [sys.executable, "-c", "import sqlalchemy.ext.asyncio, aio_pika, wasmtime, aiohttp"],
            url,
        ),
    }


def timed(command: list[str], url: str) -> float:
    env = {**os.environ, "STEPFLEET_DATABASE_URL": url}
    began = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False, env=env)
    return (time.perf_counter() - began) * 1000


def p95(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    repeat = parser.parse_args().repeat
    report = {}
    with seeded_database() as url:
        check = subprocess.run(
            [*STEPFLEET, "status", INSTANCE, "--tenant", TENANT],
            capture_output=True,
            text=True,
            env={**os.environ, "STEPFLEET_DATABASE_URL": url},
        )
        if check.returncode != 0 or "status    complete" not in check.stdout:
            sys.exit(f"status of the seeded instance failed: {check.stdout}{check.stderr}")
        load_before = os.getloadavg()
        for name, (command, target) in cases(url).items():
            times = [timed(command, target) for _ in range(repeat)]
            report[name] = {
                "median_ms": round(statistics.median(times), 1),
                "p95_ms": round(p95(times), 1),
                "min_ms": round(min(times), 1),
            }
    print(
        json.dumps(
            {
                "repeat": repeat,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "cases": report,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
