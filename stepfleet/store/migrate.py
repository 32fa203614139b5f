"""Apply the Alembic migrations, creating the database first if it does not exist."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stepfleet.store.errors import StoreUnavailable

_PACKAGED = Path(__file__).parent / "migrations"
_SOURCE_TREE = Path(__file__).resolve().parents[2] / "migrations"


def migrations_dir() -> Path:
    """Return the migrations folder: packaged in a wheel, top-level in a source checkout."""
    return _PACKAGED if _PACKAGED.is_dir() else _SOURCE_TREE


def alembic_config(url: str) -> Config:
    """Build an Alembic config for `url` without an alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def ensure_database(url: str) -> bool:
    """Create the database named in `url` if missing; return True if it was created."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        raise ValueError("the database URL names no database")
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).first()
            if exists:
                return False
            quoted = admin.dialect.identifier_preparer.quote(name)
            connection.execute(text(f"CREATE DATABASE {quoted}"))
            return True
    except Exception as exc:
        raise StoreUnavailable(
            f"cannot reach PostgreSQL at {parsed.render_as_string()}: {exc}"
        ) from exc
    finally:
        admin.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision`."""
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """Return the schema revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """Return the newest schema revision this release's migrations know."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config("postgresql://")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads: {sorted(heads)}")
    return str(heads[0])


def schema_revision(url: str) -> str | None:
    """`current_revision`, with every failure to ask turned into StoreUnavailable."""
    try:
        return current_revision(url)
    except Exception as exc:
        raise StoreUnavailable(
            f"cannot read the schema revision at {make_url(url).render_as_string()}: {exc}"
        ) from exc
