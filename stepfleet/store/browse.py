"""Reads behind the HTTP API and the console: pages of instances and dead letters (newest
first, continued by a cursor), an instance's events, the fleet's counts, the audit log."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from stepfleet.schemas import InstanceKey, InstanceStatus
from stepfleet.store.dead_letter_rows import DeadLetter, LetterFilter, filtered, letter_from_row
from stepfleet.store.errors import translated
from stepfleet.store.records import AuditEntry, InstanceRecord
from stepfleet.store.rows import record_from_row
from stepfleet.store.tables import audit_log, dead_letters, events, instances, journal


@dataclass(frozen=True, slots=True)
class InstanceCursor:
    """Where a page of instances (newest first) ended: the last row's creation and key."""

    created_at: datetime
    tenant: str
    instance_id: str


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event sent to an instance: taken by a wait (`consumed_seq`) or stored for one."""

    event_id: str
    type: str
    payload: str
    received_at: datetime
    consumed_seq: int | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    """An audit log entry with its id (the audit log's cursor)."""

    id: int
    entry: AuditEntry


class Browse:
    """Read-only queries for people looking at the fleet; shares the PgStore's pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def ping(self) -> None:
        """Reach PostgreSQL (raises StoreUnavailable when it cannot be reached)."""
        async with translated(), self._engine.connect() as connection:
            await connection.execute(select(1))

    async def instances(
        self,
        *,
        tenant: str | None = None,
        statuses: Sequence[InstanceStatus] = (),
        module: str | None = None,
        created_since: datetime | None = None,
        after: InstanceCursor | None = None,
        limit: int = 50,
    ) -> list[InstanceRecord]:
        """A page of instances, newest first, after `after` (the previous page's last)."""
        c = instances.c
        query = select(instances)
        if tenant is not None:
            query = query.where(c.tenant == tenant).order_by(c.created_at.desc(), c.id.desc())
            if after is not None:
                query = query.where(
                    tuple_(c.created_at, c.id) < tuple_(after.created_at, after.instance_id)
                )
        else:
            query = query.order_by(c.created_at.desc(), c.tenant.desc(), c.id.desc())
            if after is not None:
                query = query.where(
                    tuple_(c.created_at, c.tenant, c.id)
                    < tuple_(after.created_at, after.tenant, after.instance_id)
                )
        if statuses:
            query = query.where(c.status.in_([s.value for s in statuses]))
        if module is not None:
            query = query.where(c.module == module)
        if created_since is not None:
            query = query.where(c.created_at >= created_since)
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(query.limit(limit))
            return [record_from_row(row) for row in result]

    async def events(self, key: InstanceKey) -> list[StoredEvent]:
        """The events an instance received, oldest first."""
        c = events.c
        query = (
            select(events)
            .where(c.tenant == key.tenant, c.instance_id == key.instance_id)
            .order_by(c.received_at, c.event_id)
        )
        async with translated(), self._engine.connect() as connection:
            return [
                StoredEvent(r.event_id, r.type, r.payload, r.received_at, r.consumed_seq)
                for r in await connection.execute(query)
            ]

    async def letters(
        self, letter_filter: LetterFilter, *, before_id: int | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        """A page of archived letters, newest first, before the letter `before_id`."""
        query = filtered(select(dead_letters), letter_filter).order_by(dead_letters.c.id.desc())
        if before_id is not None:
            query = query.where(dead_letters.c.id < before_id)
        async with translated(), self._engine.connect() as connection:
            result = await connection.execute(query.limit(limit))
            return [letter_from_row(row) for row in result]

    async def letter(self, letter_id: int) -> DeadLetter | None:
        """One archived letter, replayed or not."""
        async with translated(), self._engine.connect() as connection:
            row = (
                await connection.execute(select(dead_letters).where(dead_letters.c.id == letter_id))
            ).first()
            return None if row is None else letter_from_row(row)

    async def letters_by_reason(self, tenant: str | None = None) -> dict[str, int]:
        """How many letters wait in the archive (not replayed), by reason."""
        c = dead_letters.c
        query = select(c.reason, func.count()).where(c.replayed_at.is_(None)).group_by(c.reason)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        async with translated(), self._engine.connect() as connection:
            return {row[0]: int(row[1]) for row in await connection.execute(query)}

    async def status_counts(self, tenant: str | None = None) -> dict[str, int]:
        """How many instances there are in each status."""
        c = instances.c
        query = select(c.status, func.count()).group_by(c.status)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        async with translated(), self._engine.connect() as connection:
            return {row[0]: int(row[1]) for row in await connection.execute(query)}

    async def journal_entries_since(self, seconds: float, tenant: str | None = None) -> int:
        """Journal entries written in the last `seconds` (each step, sleep, wait, event...)."""
        c = journal.c
        query = select(func.count()).where(
            c.finished_at >= func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seconds)
        )
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        async with translated(), self._engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())

    async def audit(
        self,
        *,
        limit: int = 50,
        action: str | None = None,
        actor: str | None = None,
        before_id: int | None = None,
    ) -> list[AuditRow]:
        """A page of the audit log, newest first, before the entry `before_id`."""
        c = audit_log.c
        query = select(audit_log).order_by(c.id.desc()).limit(limit)
        if action:
            query = query.where(c.action == action)
        if actor:
            query = query.where(c.actor == actor)
        if before_id is not None:
            query = query.where(c.id < before_id)
        async with translated(), self._engine.connect() as connection:
            return [_audit(row) for row in await connection.execute(query)]


def _audit(row: Any) -> AuditRow:
    return AuditRow(
        id=row.id,
        entry=AuditEntry(
            actor=row.actor,
            action=row.action,
            target=row.target,
            filter=json.loads(row.filter),
            count=row._mapping["count"],
            detail=row.detail,
            at=row.at,
        ),
    )
