"""Replay cost as a journal grows: one 1,000-step workflow in the local runner (no services).

Each delivery re-runs the guest over its whole journal, which the SDK answers inside the guest
from one buffer. Prints JSON: total time, the run time at 0, 10, 100 and 1,000 entries, and
the replay cost per journal entry.

    python bench/long_journal.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from stepfleet.engine import EngineLimits, InstanceState, decide
from stepfleet.sandbox import GuestRun, ReplayJournal, WasmSandbox, encode_replay_buffer
from stepfleet.schemas import InstanceKey, InstanceStatus, digest_of

PLAYBOOK = Path(__file__).resolve().parents[1] / "guest" / "examples" / "playbook" / "playbook.wasm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
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


def _now() -> datetime:
    return datetime.now(UTC)


if __name__ == "__main__":
    main()
