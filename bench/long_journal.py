"""Replay cost as a journal grows: one 1,000-step workflow in the local runner (no services).

Each delivery re-runs the guest over its whole journal, which the SDK answers inside the guest
from one buffer. Prints JSON: total time, the run time at 0, 10, 100 and 1,000 entries, and
the replay cost per journal entry.

    python bench/long_journal.py [--steps 1000]

--fleet instead runs the fleet (1 worker process, PostgreSQL, RabbitMQ) on workflows of 10,
100 and 1,000 steps (the playbook with one `do` op per step; about --total steps each) and
prints, per length, steps/s and where each delivery's time went (bench/phases.py): the
transaction's share must stay flat as workflows grow, the guest's grows with the replay (and
with the playbook parsing one op per step from its params on every run).

    python bench/long_journal.py --fleet [--total 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from stepfleet.client import CreateRequest, Producer
from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import GuestRun, ReplayJournal, WasmSandbox, encode_replay_buffer
from stepfleet.schemas import InstanceKey, InstanceStatus, digest_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, Deployment, bench_deployment
from phases import per_delivery, snapshot
from throughput import completion_times, start_workers, stop_workers

PLAYBOOK = Path(__file__).resolve().parents[1] / "guest" / "examples" / "playbook" / "playbook.wasm"
TENANT = "long"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--fleet", action="store_true", help="steps/s of the fleet per length")
    parser.add_argument("--total", type=int, default=3000, help="--fleet: steps per length")
    args = parser.parse_args()
    if args.fleet:
        print(json.dumps(asyncio.run(fleet(args.total)), indent=2))
        return
    wasm = PLAYBOOK.read_bytes()
    digest = digest_of(wasm)
    sandbox = WasmSandbox()
    sandbox.load(digest, wasm)
    params = json.dumps({"ops": [{"op": "do", "name": f"s{i}"} for i in range(args.steps)]})
    key = InstanceKey("bench", "long")
    journal = ReplayJournal()
    run_ms: dict[int, float] = {}
    started = time.perf_counter()
    while True:
        begin = time.perf_counter()
        report = sandbox.run(
            GuestRun(digest, encode_replay_buffer(key.instance_id, params, journal), len(journal))
        )
        run_ms[len(journal)] = (time.perf_counter() - begin) * 1000
        state = InstanceState(key, digest, InstanceStatus.RUNNING, len(journal))
        decision = decide(
            state,
            journal.entries,
            report,
            started_at=_now(),
            finished_at=_now(),
            limits=EngineLimits(),
        )
        journal.extend(decision.entries)
        if decision.status.is_final:
            break
    total = time.perf_counter() - started
    sandbox.close()
    print(
        json.dumps(
            {
                "steps": args.steps,
                "status": decision.status.value,
                "total_s": round(total, 3),
                "runs": len(run_ms),
                **{
                    f"run_ms_at_{n}_entries": round(run_ms[n], 3)
                    for n in (0, 10, 100, args.steps)
                    if n in run_ms
                },
                # The playbook parses and checks its params (one op per step) on every run, so
                # the run at 0 entries is the baseline; the rest is replaying the journal.
                "replay_us_per_entry": round(
                    (run_ms[args.steps] - run_ms[0]) * 1000 / max(args.steps, 1), 2
                ),
            },
            indent=2,
        )
    )


async def fleet(total: int) -> dict[str, object]:
    """Steps/s and phases of one worker on workflows of 10, 100 and 1,000 steps."""
    report: dict[str, object] = {"worker_processes": 1}
    async with bench_deployment(PLAYBOOK) as deployment:
        await deployment.push(TENANT)
        workers = start_workers(1, deployment.env)
        try:
            await run_workflows(deployment, 2, 3)  # warm: connections, the compiled module
            for length in (10, 100, 1000):
                count = max(1, total // length)
                before = await snapshot(workers)
                seconds = await run_workflows(deployment, count, length)
                after = await snapshot(workers)
                report[f"steps_{length}"] = {
                    "workflows": count,
                    "steps": count * length,
                    "seconds": round(seconds, 3),
                    "steps_per_s": round(count * length / seconds, 1),
                    "phases": per_delivery(before, after),
                }
        finally:
            stop_workers(workers)
    return report


async def run_workflows(deployment: Deployment, count: int, length: int) -> float:
    """Start `count` workflows of `length` steps at once; seconds until the last completes."""
    params = {"ops": [{"op": "do", "name": f"s{i}"} for i in range(length)]}
    ids = [f"long-{uuid.uuid4().hex[:16]}" for _ in range(count)]
    async with Producer(AMQP, deployment.topology) as producer:
        started = datetime.now(UTC)
        await producer.create_batch(
            [CreateRequest(TENANT, deployment.digest, params, i) for i in ids]
        )
    finished = await completion_times(deployment.url, ids)
    return (max(finished.values()) - started).total_seconds()


def _now() -> datetime:
    return datetime.now(UTC)


if __name__ == "__main__":
    main()
