"""Errors of the store room; driver errors are translated at the boundary, cause kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class StoreError(Exception):
    """Root of the store's errors."""

    retryable = False


class StoreUnavailable(StoreError):
    """PostgreSQL could not be reached or dropped the connection; try again later."""

    retryable = True


class IntegrityViolation(StoreError):
    """A write broke a rule the schema enforces: a second journal entry or failed attempt at
    one position, an instance of a module never stored, rows of a missing instance.

    MemoryStore raises it; PgStore lets PostgreSQL's IntegrityError through unchanged.
    """


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn connection-level driver errors into StoreUnavailable."""
    # Imported here so that the error classes cost nothing to import (`stepfleet status`
    # reads without SQLAlchemy, and catches these).
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise StoreUnavailable(str(exc.orig or exc).strip().splitlines()[0]) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable("connection to PostgreSQL was lost") from exc
        raise
