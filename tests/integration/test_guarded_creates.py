"""Guarded creates on PgStore: the cycle tests of tests/unit/test_guarded_creates.py, run
against this run's database (WRITE_CREATED, its own transaction) instead of MemoryStore."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from sqlalchemy.engine import make_url

from stepfleet.schemas import TenantLimits
from stepfleet.store import PgStore, StepStore
from stepfleet.store import statements as sql
from tests.unit.test_guarded_creates import (  # noqa: F401 (collected here too)
    StoreMaker,
    fleet_of,
    test_a_create_is_written_without_a_transaction,
    test_a_create_of_a_module_never_pushed_is_dead_lettered,
    test_a_create_of_other_code_for_an_existing_row_is_refused,
    test_a_create_stopped_at_a_call_delivered_again_is_a_duplicate,
    test_a_first_run_that_stops_at_a_call_is_written_without_a_transaction,
    test_a_first_run_that_waits_for_an_event_goes_through_the_transaction,
    test_a_guarded_create_goes_on_locally_as_any_next_step,
    test_a_repeated_create_is_a_duplicate_and_writes_nothing,
    test_a_tenant_with_quotas_creates_through_the_transaction,
    test_confirmed_outbox_rows_go_with_the_guarded_create,
    test_events_held_for_a_guarded_create_are_taken_by_a_later_wait,
)

pytestmark = pytest.mark.services


@pytest.fixture
def make_store(store: PgStore) -> StoreMaker:
    async def made(tenant: str, limits: TenantLimits) -> StepStore:
        await store.tenants.add(tenant, None, limits)
        return store

    return made


async def test_the_calm_check_sees_what_committed_since_the_snapshot(database_url: str) -> None:
    """WRITE_CREATED's snapshot predates its locks: a transaction that committed between the
    two (one that got its id before, or after, the snapshot) makes it write nothing."""
    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    check = f"""
        WITH slept AS MATERIALIZED (SELECT pg_sleep(0.6))
        SELECT CASE WHEN (SELECT count(*) FROM slept) = 1 THEN {sql.NONE_COMMITTED_SINCE} END
    """  # noqa: S608 (a constant)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as quiet:
        # Without the sleep, and a few times: other tests' transactions commit meanwhile.
        calm = [await (await quiet.execute(f"SELECT {sql.NONE_COMMITTED_SINCE}")).fetchone()]
        calm += [await (await quiet.execute(f"SELECT {sql.NONE_COMMITTED_SINCE}")).fetchone()]
        assert (True,) in calm
    for id_first in (True, False):
        async with (
            await psycopg.AsyncConnection.connect(url) as other,
            await psycopg.AsyncConnection.connect(url, autocommit=True) as statement,
        ):
            if id_first:
                await other.execute("SELECT pg_current_xact_id()")

            async def commit_meanwhile() -> None:
                await asyncio.sleep(0.2)
                await other.execute("SELECT pg_current_xact_id()")
                await other.commit()

            committing = asyncio.create_task(commit_meanwhile())
            row = await (await statement.execute(check)).fetchone()
            await committing
            assert row == (False,)
