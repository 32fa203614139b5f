"""Chains on PgStore: the cycle tests of tests/unit/test_chains.py, run against this run's
database (several steps in one WRITE_CREATED or WRITE_UNCHANGED) instead of MemoryStore."""

from __future__ import annotations

import pytest

from tests.integration.test_guarded_creates import make_store  # noqa: F401 (fixture)
from tests.unit.test_chains import (  # noqa: F401 (collected here too)
    fleet_of,
    fleets,
    test_a_chain_ends_before_a_step_that_makes_a_call,
    test_a_chain_whose_row_moved_writes_none_of_its_steps,
    test_a_create_and_the_steps_after_it_are_written_by_one_statement,
    test_a_statement_for_many_instances_chains_one_step,
    test_a_statement_writes_at_most_chain_steps_steps,
    test_a_step_that_fails_ends_the_chain_and_its_attempt_is_written_with_it,
    test_a_worker_that_takes_the_step_on_makes_its_call_at_once,
)

pytestmark = pytest.mark.services
