"""The reads of `stepfleet status` through psycopg alone.

Importing SQLAlchemy takes most of a second, and operators run `status` in loops and scripts;
its few queries need nothing SQLAlchemy adds. Rows become records through the same functions
as PgStore's (store/row_views.py), and a test holds the two to the same answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, LiteralString, Self

import psycopg
from psycopg.rows import dict_row

from stepfleet.schemas import InstanceKey
from stepfleet.store.errors import StoreUnavailable
from stepfleet.store.records import HeldEvent, InstanceDetail, InstanceRecord
from stepfleet.store.row_views import failed_attempt, held_event, instance_record, journal_entry

_SCHEME = "postgresql+psycopg://"

_INSTANCES = "SELECT * FROM instances WHERE id = %(id)s ORDER BY tenant"
_INSTANCES_OF_TENANT = "SELECT * FROM instances WHERE id = %(id)s AND tenant = %(tenant)s"
_JOURNAL = "SELECT * FROM journal WHERE tenant = %(tenant)s AND instance_id = %(id)s ORDER BY seq"
_ATTEMPTS = """
    SELECT * FROM step_attempts WHERE tenant = %(tenant)s AND instance_id = %(id)s
    ORDER BY seq, attempt
"""
_WAITING_EVENTS = """
    SELECT count(*) AS n FROM events
    WHERE tenant = %(tenant)s AND instance_id = %(id)s AND consumed_seq IS NULL
"""
_HELD_EVENTS = """
    SELECT event_id, type, received_at, expires_at FROM early_events
    WHERE tenant = %(tenant)s AND instance_id = %(id)s
    ORDER BY received_at, event_id
"""

_REFUSED_CREATE = """
    SELECT id, reason FROM dead_letters
    WHERE instance_id = %(id)s AND kind = 'create' AND replayed_at IS NULL
    ORDER BY id DESC LIMIT 1
"""
_REFUSED_CREATE_OF_TENANT = """
    SELECT id, reason FROM dead_letters
    WHERE instance_id = %(id)s AND tenant = %(tenant)s AND kind = 'create'
      AND replayed_at IS NULL
    ORDER BY id DESC LIMIT 1
"""


def libpq_url(database_url: str) -> str | None:
    """The settings' database URL (SQLAlchemy's form) as libpq takes it; None when it names a
    driver other than psycopg (whose URLs SQLAlchemy may read differently)."""
    if not database_url.startswith(_SCHEME):
        return None
    return "postgresql://" + database_url.removeprefix(_SCHEME)


@contextmanager
def _translated() -> Iterator[None]:
    """Connection-level driver errors as StoreUnavailable, with PgStore's wording."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise StoreUnavailable(str(exc).strip().splitlines()[0]) from exc


class DirectReader:
    """One connection, one read-only snapshot: the lookups `status` makes, answering as
    PgStore's methods of the same names do."""

    def __init__(self, url: str) -> None:
        """`url` in libpq's form (see `libpq_url`)."""
        self._url = url
        self._connection: psycopg.Connection[dict[str, Any]] | None = None

    def __enter__(self) -> Self:
        with _translated():
            self._connection = psycopg.connect(self._url, row_factory=dict_row)
        # Every read below sees the same moment, whatever workers commit meanwhile.
        self._connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self._connection.read_only = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _rows(self, query: LiteralString, params: dict[str, str]) -> list[dict[str, Any]]:
        if self._connection is None:
            raise RuntimeError("DirectReader is used outside its `with` block")
        with _translated():
            return self._connection.execute(query, params).fetchall()

    def find_instances(
        self, instance_id: str, tenant: str | None = None
    ) -> list[tuple[InstanceRecord, str]]:
        """The instances with this id (in one tenant, or in any), with their params."""
        if tenant is None:
            rows = self._rows(_INSTANCES, {"id": instance_id})
        else:
            rows = self._rows(_INSTANCES_OF_TENANT, {"id": instance_id, "tenant": tenant})
        return [(instance_record(row), row["params"]) for row in rows]

    def detail(self, key: InstanceKey) -> InstanceDetail | None:
        """An instance with its params, journal, failed attempts and stored events."""
        found = self.find_instances(key.instance_id, key.tenant)
        if not found:
            return None
        record, params = found[0]
        where = {"tenant": key.tenant, "id": key.instance_id}
        return InstanceDetail(
            record=record,
            params=params,
            journal=[journal_entry(row) for row in self._rows(_JOURNAL, where)],
            attempts=[failed_attempt(row) for row in self._rows(_ATTEMPTS, where)],
            pending_events=self._rows(_WAITING_EVENTS, where)[0]["n"],
        )

    def held_events(self, key: InstanceKey) -> list[HeldEvent]:
        """The events held for an instance that does not exist (yet), oldest first."""
        where = {"tenant": key.tenant, "id": key.instance_id}
        return [held_event(row) for row in self._rows(_HELD_EVENTS, where)]

    def refused_create(self, instance_id: str, tenant: str | None) -> tuple[int, str] | None:
        """The newest dead letter (not replayed) of a create of this instance id, and its
        reason."""
        if tenant is None:
            rows = self._rows(_REFUSED_CREATE, {"id": instance_id})
        else:
            rows = self._rows(_REFUSED_CREATE_OF_TENANT, {"id": instance_id, "tenant": tenant})
        return (rows[0]["id"], rows[0]["reason"]) if rows else None
