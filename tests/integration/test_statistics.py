"""Planner statistics follow the tables' growth: a generic plan PostgreSQL cached while a table
was small is planned again once the fleet has analyzed the grown table, one worker at a time.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from stepfleet.schemas import digest_of
from stepfleet.store import PgStore
from stepfleet.store import statements as sql
from stepfleet.store.pg import STATISTICS_LOCK_KEY
from stepfleet.workers.statistics import PlannerStatistics
from tests.integration.conftest import migrated_database

pytestmark = pytest.mark.services


@pytest.fixture
def fresh_url(run_id: str) -> Iterator[str]:
    """A database of this test's own, so no other test has analyzed or grown its tables."""
    with migrated_database(f"stepfleet_test_{run_id}_stats") as url:
        yield url


@pytest.fixture
async def fresh_store(fresh_url: str) -> AsyncIterator[PgStore]:
    store = PgStore(fresh_url)
    yield store
    await store.close()


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def add_instances(store: PgStore, url: str, first: int, count: int) -> None:
    wasm = b"\0asm\1\0\0\0"
    await store.put_module("acme", digest_of(wasm), wasm)
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute(
            "INSERT INTO instances (tenant, id, module, status, params) "
            "SELECT 'acme', 'i-' || g, %s, 'complete', '{}' "
            "FROM generate_series(%s::int, %s::int) AS g",
            (digest_of(wasm), first, first + count - 1),
        )


def prepared_lookup(url: str) -> psycopg.Connection:
    """A session that keeps a generic plan of the statement that reads instances' params,
    as a worker's prepared statement does once PostgreSQL settles on one."""
    connection = psycopg.connect(libpq(url), autocommit=True)
    connection.execute("SET plan_cache_mode = force_generic_plan")
    statement = re.sub(r":tenants", "$1", re.sub(r":ids", "$2", sql.PARAMS.text))
    connection.execute(f"PREPARE lookup (text[], text[]) AS {statement}")
    return connection


def plan_of(connection: psycopg.Connection) -> str:
    rows = connection.execute("EXPLAIN EXECUTE lookup(ARRAY['acme'], ARRAY['i-1'])")
    return "\n".join(str(row[0]) for row in rows)


async def test_a_plan_cached_on_a_small_table_is_planned_again_once_the_fleet_analyzes_it(
    fresh_store: PgStore, fresh_url: str
) -> None:
    statistics = PlannerStatistics(fresh_store)
    assert await statistics.refresh() == []  # nothing is big enough to matter yet
    session = prepared_lookup(fresh_url)
    try:
        assert "Seq Scan on instances" in plan_of(session)
        await add_instances(fresh_store, fresh_url, 1, 20_000)
        # Inserting rows does not touch the cached plan: it still reads the whole table.
        assert "Seq Scan on instances" in plan_of(session)
        assert "instances" in await statistics.refresh()
        plan = plan_of(session)
        assert "Seq Scan on instances" not in plan
        assert "Index" in plan
    finally:
        session.close()


async def test_a_table_is_analyzed_again_only_once_it_has_doubled(
    fresh_store: PgStore, fresh_url: str
) -> None:
    statistics = PlannerStatistics(fresh_store)
    await add_instances(fresh_store, fresh_url, 1, 5_000)
    assert "instances" in await statistics.refresh()
    assert await statistics.refresh() == []
    await add_instances(fresh_store, fresh_url, 5_001, 1_000)
    assert await statistics.refresh() == []
    await add_instances(fresh_store, fresh_url, 6_001, 6_000)
    assert await statistics.refresh() == ["instances"]
    assert statistics.analyzed == 2


async def test_one_worker_at_a_time_refreshes(fresh_store: PgStore, fresh_url: str) -> None:
    await add_instances(fresh_store, fresh_url, 1, 5_000)
    with psycopg.connect(libpq(fresh_url)) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (STATISTICS_LOCK_KEY,))
        assert await fresh_store.refresh_statistics() is None
    assert await fresh_store.refresh_statistics() == ["instances"]


async def test_tables_the_user_may_not_analyze_are_left_to_their_owner(
    fresh_store: PgStore, fresh_url: str, run_id: str
) -> None:
    """A user that does not own the tables would have ANALYZE skip them with a warning and
    find them grown again every period: it leaves them alone."""
    await add_instances(fresh_store, fresh_url, 1, 5_000)
    role = f"stepfleet_test_{run_id}_guest"
    with psycopg.connect(libpq(fresh_url), autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        try:
            guest = PgStore(make_url(fresh_url).set(username=role).render_as_string())
            try:
                assert await guest.refresh_statistics() == []
            finally:
                await guest.close()
        finally:
            admin.execute(f'DROP ROLE "{role}"')
    assert await fresh_store.refresh_statistics() == ["instances"]
