"""Guarded creates on PgStore: the cycle tests of tests/unit/test_guarded_creates.py, run
against this run's database (WRITE_CREATED, its own transaction) instead of MemoryStore."""

from __future__ import annotations

import pytest

from stepfleet.schemas import TenantLimits
from stepfleet.store import PgStore, StepStore
from tests.unit.test_guarded_creates import (  # noqa: F401 (collected here too)
    StoreMaker,
    fleet_of,
    test_a_create_is_written_without_a_transaction,
    test_a_create_of_a_module_never_pushed_is_dead_lettered,
    test_a_create_of_other_code_for_an_existing_row_is_refused,
    test_a_first_run_that_stops_at_a_call_goes_through_the_transaction,
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
