"""Compile bombs: what pushing one costs, and how long another tenant's step waits meanwhile.

Pushes, each a `stepfleet module push` process under the settings in the environment: its
wall time, the peak memory of its largest process (the CLI or the compiler it starts), and
whether it was refused, with the message:

- `reported`: 50,000 functions of 13 calls each, 1.5 MB (the shape of the reported bomb);
- `locals`: one 200 KB function over 1,500 locals, within the shape limits: 200 KB that needs
  gigabytes to compile;
- `order`: the C example, a real module.

Then one worker process, whose STEPFLEET_MODULE_FUNCTIONS is raised to 100,000 so that it
compiles the reported bomb (a module pushed before the limits existed). Tenant `calm` runs a
153-byte module that completes in one step, already loaded by the worker. Printed: calm's
create-to-complete latency on the idle worker (median of --runs), then while the bomb's module
compiles (its instance created first), whether the bomb was still compiling when calm's
workflow completed, and when the bomb's instance ended. A second worker with the default
limits then meets another copy of the bomb: the error its instance ends with.

Needs PostgreSQL and RabbitMQ (as `./dev check`). Prints JSON; asserts nothing.

    python bench/compile_bomb.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stepfleet.client import CreateRequest, Producer
from stepfleet.schemas import InstanceKey, digest_of
from stepfleet.store import PgStore
from stepfleet.workers.logs import configure_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import AMQP, Deployment, bench_deployment
from throughput import start_workers, stop_workers

from tests.wasm_bombs import calls_body, dense_body, guest

ORDER = Path(__file__).resolve().parents[1] / "guest" / "examples" / "order" / "order.wasm"
FINAL = ("complete", "errored")

# Runs one push and prints the peak RSS (KiB) of the largest process it waited for.
_MEASURED_PUSH = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(done.returncode)
print((done.stdout + done.stderr).strip().splitlines()[-1])
"""


def push(file: Path, tenant: str, env: dict[str, str]) -> dict[str, object]:
    started = time.perf_counter()
    measured = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURED_PUSH,
            sys.executable,
            "-m",
            "stepfleet",
            "module",
            "push",
            str(file),
            "--tenant",
            tenant,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    seconds = time.perf_counter() - started
    peak_kib, code, last_line = measured.stdout.strip().split("\n", 2)
    return {
        "bytes": file.stat().st_size,
        "seconds": round(seconds, 2),
        "peak_mib": round(int(peak_kib) / 1024, 1),
        "refused": code != "0",
        "said": last_line,
    }


async def put(url: str, tenant: str, wasm: bytes) -> str:
    """Store a module without the push checks (as if pushed before the limits existed)."""
    store = PgStore(url, pool_size=1)
    try:
        await store.put_module(tenant, digest_of(wasm), wasm)
    finally:
        await store.close()
    return digest_of(wasm)


async def create(deployment: Deployment, tenant: str, digest: str) -> InstanceKey:
    key = InstanceKey(tenant, f"{tenant}-{uuid.uuid4().hex[:10]}")
    async with Producer(AMQP, deployment.topology) as producer:
        await producer.create(CreateRequest(tenant, digest, {}, key.instance_id))
    return key


async def status(store: PgStore, key: InstanceKey) -> tuple[str | None, str | None]:
    found = await store.find_instances(key.instance_id, key.tenant)
    if not found:
        return None, None
    record = found[0][0]
    return record.status.value, record.error


async def until_final(store: PgStore, key: InstanceKey) -> float:
    """Poll until the instance is final; return when it was seen final (monotonic)."""
    async with asyncio.timeout(300):
        while True:
            if (await status(store, key))[0] in FINAL:
                return time.monotonic()
            await asyncio.sleep(0.01)


async def latency(deployment: Deployment, store: PgStore, tenant: str, digest: str) -> float:
    started = time.monotonic()
    key = await create(deployment, tenant, digest)
    return (await until_final(store, key)) - started


async def worker_phase(deployment: Deployment, runs: int, cache: Path) -> dict[str, object]:
    tag = uuid.uuid4().hex[:8]
    bomb = await put(deployment.url, "bomb", guest(50_000, calls_body(13), tag=tag))
    calm = await put(deployment.url, "calm", guest(tag=tag))
    env = {
        **deployment.env,
        "STEPFLEET_MODULE_CACHE_DIR": str(cache / "raised"),
        "STEPFLEET_MODULE_FUNCTIONS": "100000",
        "STEPFLEET_HEALTH_FILE": "",
    }
    store = PgStore(deployment.url, pool_size=1)
    workers = start_workers(1, env)
    try:
        await latency(deployment, store, "calm", calm)  # the worker starts, calm's module loads
        idle = [await latency(deployment, store, "calm", calm) for _ in range(runs)]
        bomb_started = time.monotonic()
        bomb_key = await create(deployment, "bomb", bomb)
        await asyncio.sleep(0.3)  # the bomb's delivery reaches the worker, its compile begins
        during: list[float] = []
        still_compiling: list[bool] = []
        for _ in range(runs):
            during.append(await latency(deployment, store, "calm", calm))
            still_compiling.append((await status(store, bomb_key))[0] not in FINAL)
        bomb_done = await until_final(store, bomb_key)
        bomb_status = await status(store, bomb_key)
    finally:
        stop_workers(workers)
    defaults = {
        **deployment.env,
        "STEPFLEET_MODULE_CACHE_DIR": str(cache / "defaults"),
        "STEPFLEET_HEALTH_FILE": "",
    }
    again = await put(deployment.url, "bomb", guest(50_000, calls_body(13), tag=tag + "-2"))
    workers = start_workers(1, defaults)
    try:
        refused_key = await create(deployment, "bomb", again)
        await until_final(store, refused_key)
        refused = await status(store, refused_key)
    finally:
        stop_workers(workers)
        await store.close()
    return {
        "calm_idle_ms": round(statistics.median(idle) * 1000, 1),
        "calm_during_bomb_compile_ms": [round(s * 1000, 1) for s in during],
        "bomb_still_compiling_when_calm_completed": still_compiling,
        "bomb_instance": {
            "status": bomb_status[0],
            "seconds_to_final": round(bomb_done - bomb_started, 2),
        },
        "default_limits_worker": {"status": refused[0], "error": refused[1]},
    }


async def main(runs: int) -> None:
    async with bench_deployment(ORDER) as deployment:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            files = {
                "reported": guest(50_000, calls_body(13), tag=folder.name),
                "locals": guest(1, dense_body(200_000, 1_500), tag=folder.name),
            }
            for name, wasm in files.items():
                (folder / f"{name}.wasm").write_bytes(wasm)
            env = {
                **os.environ,
                "STEPFLEET_DATABASE_URL": deployment.url,
                # A directory that does not exist: the push leaves no artifact behind.
                "STEPFLEET_MODULE_CACHE_DIR": str(folder / "no-cache"),
            }
            pushes = {
                name: await asyncio.to_thread(push, folder / f"{name}.wasm", "bench", env)
                for name in files
            }
            pushes["order"] = await asyncio.to_thread(push, ORDER, "bench", env)
            worker = await worker_phase(deployment, runs, folder)
    print(json.dumps({"push": pushes, "worker": worker}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    configure_logging("warning")  # to stderr: stdout is the JSON
    asyncio.run(main(parser.parse_args().runs))
