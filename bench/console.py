"""How long the API's and the console's pages take over a large fleet's rows.

Fills a throwaway database with --instances instances (100,000 by default, over 10 tenants,
every status, two journal entries each) and --letters dead letters (10,000, five reasons),
then asks each page --repeat times through the ASGI app in this process (token check,
queries, JSON or HTML rendering; no network) and prints JSON: the median and p95 in ms of
each page, with and without filters, and a page deep in the cursor chain.

    python bench/console.py [--instances 100000] [--letters 10000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from stepfleet.api import ApiSettings, create_app
from stepfleet.api.tokens import issue_token
from stepfleet.store import PgStore
from stepfleet.workers.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AMQP, bench_deployment

PLAYBOOK = Path(__file__).resolve().parents[1] / "guest" / "examples" / "playbook" / "playbook.wasm"
TENANTS = [f"t{i}" for i in range(10)]
STATUSES = ["complete"] * 6 + ["running", "sleeping", "waiting", "errored"]
REASONS = ["unknown-module", "bad-body", "delivery-limit", "over-limit", "instance-finished"]


def fill(url: str, digest: str, instances: int, letters: int) -> None:
    """Rows as a busy fleet leaves them, written with set-based SQL."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                """
                INSERT INTO instances (tenant, id, module, status, position, params, error,
                                       created_at, updated_at)
                SELECT 't' || (n % 10), 'i-' || n, :digest,
                       (ARRAY['complete','complete','complete','complete','complete',
                              'complete','running','sleeping','waiting','errored'])[n / 10 % 10 + 1],
                       2, '{"n":' || n || '}',
                       CASE WHEN n / 10 % 10 = 9 THEN 'step 1 failed: attempt 3 failed' END,
                       now() - make_interval(secs => :count - n),
                       now() - make_interval(secs => :count - n)
                FROM generate_series(1, :count) AS n
                """
            ),
            {"digest": digest, "count": instances},
        )
        connection.execute(
            text(
                """
                INSERT INTO journal (tenant, instance_id, seq, kind, name, value, attempt,
                                     started_at, finished_at)
                SELECT 't' || (n % 10), 'i-' || n, s, 1, 'step-' || s, :value, 1,
                       now() - make_interval(secs => :count - n),
                       now() - make_interval(secs => :count - n) + interval '3 ms'
                FROM generate_series(1, :count) AS n, generate_series(0, 1) AS s
                """
            ),
            {"count": instances, "value": '{"ok":true}'},
        )
        connection.execute(
            text(
                """
                INSERT INTO dead_letters (letter_key, received_at, reason, detail, tenant,
                    instance_id, kind, module, routing_key, headers, body, source, account,
                    body_size, body_sha256, stored_bytes)
                SELECT 'k-' || n, now() - make_interval(secs => :count - n),
                       (ARRAY['unknown-module','bad-body','delivery-limit','over-limit',
                              'instance-finished'])[n / 10 % 5 + 1],
                       'detail of letter ' || n, 't' || (n % 10), 'i-' || (n * 7), 'create',
                       :digest, 't' || (n % 10) || '.create', :headers,
                       CAST(:body AS bytea), 'worker', 't' || (n % 10), 13, 'x', 30
                FROM generate_series(1, :count) AS n
                """
            ),
            {
                "digest": digest,
                "count": letters,
                "body": b'{"params":{}}',
                "headers": '{"x-kind":"create"}',
            },
        )
        connection.execute(text("ANALYZE"))
    engine.dispose()


async def timed(
    client: httpx.AsyncClient, path: str, repeat: int, headers: dict[str, str]
) -> dict[str, Any]:
    samples = []
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        answer = await client.get(path, headers=headers)
        samples.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        size = len(answer.content)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 1),
        "p95_ms": round(samples[max(0, int(len(samples) * 0.95) - 1)], 1),
        "bytes": size,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--letters", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    async with bench_deployment(PLAYBOOK) as deployment:
        await deployment.push(*TENANTS)
        started = time.perf_counter()
        await asyncio.to_thread(
            fill, deployment.url, deployment.digest, args.instances, args.letters
        )
        fill_s = time.perf_counter() - started
        store = PgStore(deployment.url, pool_size=1)
        _, secret = await issue_token(store, "bench", "viewer", None, actor="bench")
        await store.close()
        settings = Settings(
            database_url=deployment.url,
            amqp_url=AMQP,
            prefix=deployment.topology.prefix,
            health_file=None,
        )
        app = create_app(settings, ApiSettings())
        api = {"Authorization": f"Bearer {secret}"}
        web = {"Cookie": f"stepfleet_session={secret}"}
        results: dict[str, Any] = {}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        ) as client:
            deep = "/api/v1/instances?limit=50"
            for _ in range(40):  # the 41st page of the unfiltered listing
                page = (await client.get(deep, headers=api)).json()
                deep = f"/api/v1/instances?limit=50&cursor={page['next_cursor']}"
            pages = {
                "api instances": ("/api/v1/instances", api),
                "api instances tenant": ("/api/v1/instances?tenant=t3", api),
                "api instances tenant+status": ("/api/v1/instances?tenant=t3&status=errored", api),
                "api instances status (all tenants)": ("/api/v1/instances?status=waiting", api),
                "api instances since": (
                    "/api/v1/instances?tenant=t5&since=2000-01-01T00:00:00Z",
                    api,
                ),
                "api instances page 41 (cursor)": (deep, api),
                "api instance detail": ("/api/v1/instances/t3/i-53", api),
                "api dead letters": ("/api/v1/dead-letters", api),
                "api dead letters reason": ("/api/v1/dead-letters?reason=bad-body", api),
                "api dead letters tenant+reason": (
                    "/api/v1/dead-letters?tenant=t2&reason=over-limit",
                    api,
                ),
                "api overview": ("/api/v1/overview", api),
                "console overview": ("/", web),
                "console instances": ("/instances", web),
                "console instances tenant+status": ("/instances?tenant=t3&status=errored", web),
                "console instance page": ("/instances/t3/i-53", web),
                "console dead letters": ("/dead-letters", web),
                "console dead letters tenant+reason": (
                    "/dead-letters?tenant=t2&reason=over-limit",
                    web,
                ),
            }
            for name, (path, headers) in pages.items():
                results[name] = await timed(client, path, args.repeat, headers)
        await app.state.fleet.close()
    worst = max(r["p95_ms"] for r in results.values())
    print(
        json.dumps(
            {
                "instances": args.instances,
                "dead_letters": args.letters,
                "page_size": 50,
                "repeat": args.repeat,
                "fill_seconds": round(fill_s, 1),
                "pages": results,
                "worst_p95_ms": worst,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
