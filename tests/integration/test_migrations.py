"""The Alembic migrations and the SQLAlchemy tables describe the same schema."""

from __future__ import annotations

import hashlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.broker import Topology
from stepfleet.control import DeadLetters
from stepfleet.store import LetterFilter, PgStore
from stepfleet.store.migrate import alembic_config, current_revision, ensure_database, upgrade
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


async def test_letters_archived_before_0006_are_never_replayed(database_url, run_id):
    """Nothing the broker vouched for was recorded about older letters: after 0006 they are
    `legacy`, keep their size, hash and usage, and a replay refuses them, a wake included."""
    url = make_url(database_url).set(database=f"stepfleet_test_{run_id}_legacy")
    legacy_url = url.render_as_string(hide_password=False)
    ensure_database(legacy_url)
    try:
        upgrade(legacy_url, "0005")
        engine = create_engine(legacy_url)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO dead_letters (letter_key, reason, detail, tenant, instance_id,"
                    " kind, routing_key, headers, body) VALUES ('k', 'expired', '', 'victim',"
                    " 'i', 'wake', 'victim.wake', :headers, :body)"
                ),
                {"headers": '{"x-original-user-id": "stepfleet.tenant.victim"}', "body": b"{}"},
            )
        engine.dispose()
        upgrade(legacy_url)
        store = PgStore(legacy_url)
        try:
            [letter] = await store.dead_letters.find(LetterFilter())
            assert (letter.source, letter.sender, letter.first_exchange) == ("legacy", None, None)
            assert (letter.body_size, letter.account) == (2, "victim")
            assert letter.body_sha256 == hashlib.sha256(b"{}").hexdigest()
            replay = DeadLetters(store, None, Topology(), user_id="fleet", actor="test")
            outcome = await replay.replay(LetterFilter(ids=(letter.id,)))
            assert outcome.done == []
            assert "archived before stepfleet recorded who sent" in outcome.skipped[letter.id]
        finally:
            await store.close()
    finally:
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        admin.dispose()
