"""CLI start-up: how long `stepfleet` takes before it does anything, per command.

Each case runs in a new interpreter --repeat times; prints the median and the fastest, in
milliseconds, as JSON. The commands run as `python -m stepfleet ...`. `status` is pointed at a
port where nothing listens, so it measures start-up, settings and the failed connect, not a
query. No services needed.

    python bench/cli_startup.py [--repeat 10]

To compare with another checkout, run it from a directory outside both with
`PYTHONPATH=/path/to/other/checkout` (the current directory would come first on the path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

STEPFLEET = [sys.executable, "-m", "stepfleet"]

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import stepfleet.cli.main": [sys.executable, "-c", "import stepfleet.cli.main"],
    "stepfleet --help": [*STEPFLEET, "--help"],
    "stepfleet status --help": [*STEPFLEET, "status", "--help"],
    "stepfleet status ID (no database)": [*STEPFLEET, "status", "nope", "--tenant", "acme"],
    "import the worker's libraries": [
        sys.executable,
        "-c",
        "import sqlalchemy.ext.asyncio, aio_pika, wasmtime, aiohttp",
    ],
}


def timed(command: list[str]) -> float:
    env = {**os.environ, "STEPFLEET_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/x"}
    began = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False, env=env)
    return (time.perf_counter() - began) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    repeat = parser.parse_args().repeat
    report = {}
    for name, command in CASES.items():
        times = [timed(command) for _ in range(repeat)]
        report[name] = {
            "median_ms": round(statistics.median(times), 1),
            "min_ms": round(min(times), 1),
        }
    print(
        json.dumps({"repeat": repeat, "load_average": os.getloadavg(), "cases": report}, indent=2)
    )


if __name__ == "__main__":
    main()
