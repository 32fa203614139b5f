"""What one stall sweep costs PostgreSQL, on a table of many live instances.

Fills a throwaway database with --running instances that are `running` with no wait (the
sweep's candidates by status, all recently updated), --sleeping parked ones and --outbox
outbox rows, then times sweeps (the advisory lock, the claiming query and the swept_at update;
no publish): one that finds nothing, and one after --unmoved of the running instances were
made older than the threshold (it claims up to 500). Prints JSON.

    python bench/sweep.py [--running 100000] [--sleeping 100000] [--outbox 2000] [--unmoved 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from stepfleet.store import PgStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_deployment

PLAYBOOK = Path(__file__).resolve().parents[1] / "guest" / "examples" / "playbook" / "playbook.wasm"

FILL = text(
    """
    INSERT INTO instances (tenant, id, module, status, params, wait_kind, wait_name, wake_at)
    SELECT 'acme', :label || n, :module, :status, '{}',
           CASE WHEN :status = 'sleeping' THEN 'sleep' END,
           CASE WHEN :status = 'sleeping' THEN 'nap' END,
           CASE WHEN :status = 'sleeping' THEN now() + interval '1 day' END
    FROM generate_series(1, :count) AS n
    """
)

OUTBOX = text(
    """
    INSERT INTO outbox (routing_key, headers, body)
    SELECT 'acme.step',
           json_build_object('x-tenant', 'acme', 'x-instance-id', 'run-' || n)::text,
           CAST(:body AS bytea)
    FROM generate_series(1, :count) AS n
    """
)

AGE = text(
    """
    UPDATE instances SET updated_at = now() - interval '1 hour'
    WHERE (tenant, id) IN (SELECT tenant, id FROM instances WHERE status = 'running'
                           AND id LIKE 'run-%' ORDER BY id DESC LIMIT :count)
    """
)


async def timed_sweep(store: PgStore) -> tuple[float, int]:
    started = time.perf_counter()
    async with store.claim_unmoved(older_than_seconds=300, limit=500) as found:
        claimed = len(found or [])
    return (time.perf_counter() - started) * 1000, claimed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--running", type=int, default=100_000)
    parser.add_argument("--sleeping", type=int, default=100_000)
    parser.add_argument("--outbox", type=int, default=2_000)
    parser.add_argument("--unmoved", type=int, default=500)
    args = parser.parse_args()

    async with bench_deployment(PLAYBOOK) as deployment:
        await deployment.push("acme")
        engine = create_engine(deployment.url)
        with engine.begin() as connection:
            for label, status, count in (
                ("run-", "running", args.running),
                ("nap-", "sleeping", args.sleeping),
            ):
                connection.execute(
                    FILL,
                    {"label": label, "module": deployment.digest, "status": status, "count": count},
                )
            body = b'{"version":1,"position":0,"generation":0}'
            connection.execute(OUTBOX, {"count": args.outbox, "body": body})
        with engine.connect() as connection:
            connection.execute(text("ANALYZE instances"))
            connection.execute(text("ANALYZE outbox"))
            connection.commit()
        store = PgStore(deployment.url, pool_size=1)
        try:
            await timed_sweep(store)  # warm the pool and the plan cache
            idle = [await timed_sweep(store) for _ in range(5)]
            with engine.begin() as connection:
                connection.execute(AGE, {"count": args.unmoved})
            busy_ms, claimed = await timed_sweep(store)
        finally:
            await store.close()
            engine.dispose()
    print(
        json.dumps(
            {
                "running": args.running,
                "sleeping": args.sleeping,
                "outbox_rows": args.outbox,
                "sweep_finding_nothing_ms": round(sorted(ms for ms, _ in idle)[2], 2),
                "sweep_claiming_ms": round(busy_ms, 2),
                "claimed": claimed,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
