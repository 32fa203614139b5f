"""The Alembic migrations and the SQLAlchemy tables describe the same schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from stepfleet.store.migrate import alembic_config, current_revision
from stepfleet.store.tables import metadata

pytestmark = pytest.mark.services


def test_head_matches_the_tables(database_url):
    """A database migrated to head has exactly the tables, columns and constraints of tables.py."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
    finally:
        engine.dispose()
    assert diff == [], f"migrations and stepfleet/store/tables.py differ: {diff}"


def test_database_is_at_head(database_url):
    """The test database was brought to the newest revision, and there is only one."""
    heads = ScriptDirectory.from_config(alembic_config(database_url)).get_heads()
    assert len(heads) == 1, heads
    assert current_revision(database_url) == heads[0]
