"""The per-step statements stay within what psycopg caches once converted.

psycopg parses a query's text into PostgreSQL's form at every execution unless the query is
short enough and has few enough parameters for its cache; the statements every step runs must
fit, or each execution pays for the parse.
"""

from __future__ import annotations

import pytest
from psycopg import _queries
from sqlalchemy import TextClause
from sqlalchemy.dialects.postgresql import psycopg

from stepfleet.store import statements as sql


@pytest.mark.parametrize(
    "statement",
    [
        sql.WRITE_BATCH,
        sql.WRITE_UNCHANGED,
        sql.WRITE_CREATED,
        sql.LOCK_INSTANCES,
        sql.INSERT_INSTANCES,
    ],
    ids=["WRITE_BATCH", "WRITE_UNCHANGED", "WRITE_CREATED", "LOCK_INSTANCES", "INSERT_INSTANCES"],
)
def test_a_per_step_statement_fits_psycopgs_query_cache(statement: TextClause) -> None:
    compiled = statement.compile(dialect=psycopg.dialect())
    assert len(str(compiled).encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(compiled.params) <= _queries.MAX_CACHED_STATEMENT_PARAMS
