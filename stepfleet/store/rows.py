"""Row mapping and statements shared by the per-step path and operator actions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from stepfleet.schemas import InstanceKey, JournalEntry
from stepfleet.store.records import InstanceRecord
from stepfleet.store.row_views import instance_record, journal_entry
from stepfleet.store.tables import journal, modules

STATE_COLUMNS = """tenant, id, module, status, position, generation, attempt, wait_kind, wait_name,
    wait_event, wait_timeout_ms, wake_at, mode, end_status, state_bytes, error, traceparent"""

# The oldest stored event of the type each wait asks for, taken for the wait's position.
_TAKE_EVENTS = text(
    """
    UPDATE events AS e SET consumed_seq = w.seq
    FROM (
        SELECT DISTINCT ON (ev.tenant, ev.instance_id) ev.tenant, ev.instance_id, ev.event_id,
               w.seq
        FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:types AS text[]),
                    CAST(:seqs AS int[])) AS w(tenant, instance_id, type, seq)
        JOIN events AS ev ON ev.tenant = w.tenant AND ev.instance_id = w.instance_id
             AND ev.type = w.type AND ev.consumed_seq IS NULL
        ORDER BY ev.tenant, ev.instance_id, ev.received_at, ev.event_id
    ) AS w
    WHERE e.tenant = w.tenant AND e.instance_id = w.instance_id AND e.event_id = w.event_id
    RETURNING e.tenant, e.instance_id, e.payload, e.received_at
    """
)


_DELETE_OUTBOX = text("DELETE FROM outbox WHERE id = ANY(CAST(:ids AS bigint[]))")


def split_keys(keys: Iterable[InstanceKey]) -> dict[str, list[str]]:
    keys = list(keys)
    return {"tenants": [k.tenant for k in keys], "ids": [k.instance_id for k in keys]}


def entry_from_row(row: Any) -> JournalEntry:
    return journal_entry(row._mapping)


def record_from_row(row: Any) -> InstanceRecord:
    """Build an instance record from a row that has at least the locked columns."""
    return instance_record(row._mapping)


async def take_events(
    conn: AsyncConnection, waits: Sequence[tuple[InstanceKey, str, int]]
) -> dict[InstanceKey, tuple[str, datetime]]:
    if not waits:
        return {}
    result = await conn.execute(
        _TAKE_EVENTS,
        {
            **split_keys(w[0] for w in waits),
            "types": [w[1] for w in waits],
            "seqs": [w[2] for w in waits],
        },
    )
    return {
        InstanceKey(row.tenant, row.instance_id): (row.payload, row.received_at) for row in result
    }


async def module_bytes(conn: AsyncConnection, digests: Iterable[str]) -> dict[str, bytes]:
    """Return the bytes of the stored modules among `digests`."""
    wanted = list(digests)
    if not wanted:
        return {}
    result = await conn.execute(
        select(modules.c.digest, modules.c.wasm).where(modules.c.digest.in_(wanted))
    )
    return {row.digest: bytes(row.wasm) for row in result}


async def delete_outbox(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Forget outbox rows (their publish was confirmed)."""
    if ids:
        await conn.execute(_DELETE_OUTBOX, {"ids": list(ids)})


async def journal_of(conn: AsyncConnection, key: InstanceKey) -> list[JournalEntry]:
    """Return an instance's whole journal in order."""
    result = await conn.execute(
        select(journal)
        .where(journal.c.tenant == key.tenant, journal.c.instance_id == key.instance_id)
        .order_by(journal.c.seq)
    )
    return [entry_from_row(row) for row in result]
