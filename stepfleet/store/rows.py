"""Row mapping and statements shared by the per-step path and operator actions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from stepfleet.schemas import (
    EntryFlags,
    EntryKind,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    RunMode,
    Waiting,
    WaitKind,
)
from stepfleet.store.records import InstanceRecord, Stall
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
    return JournalEntry(
        seq=row.seq,
        kind=EntryKind(row.kind),
        name=row.name,
        value=row.value,
        attempt=row.attempt,
        started_at=row.started_at,
        finished_at=row.finished_at,
        flags=EntryFlags(row.flags),
    )


def record_from_row(row: Any) -> InstanceRecord:
    """Build an instance record from a row that has at least the locked columns."""
    mapping = row._mapping
    waiting = None
    if row.wait_kind is not None:
        waiting = Waiting(
            WaitKind(row.wait_kind),
            row.wait_name,
            row.wake_at,
            row.wait_event,
            row.wait_timeout_ms,
        )
    return InstanceRecord(
        key=InstanceKey(row.tenant, row.id),
        module=row.module,
        status=InstanceStatus(row.status),
        position=row.position,
        generation=row.generation,
        attempt=row.attempt,
        waiting=waiting,
        mode=RunMode(row.mode),
        end_status=InstanceStatus(row.end_status) if row.end_status else None,
        state_bytes=row.state_bytes,
        output=mapping.get("output"),
        error=row.error,
        created_at=mapping.get("created_at"),
        updated_at=mapping.get("updated_at"),
        finished_at=mapping.get("finished_at"),
        retain_until=mapping.get("retain_until"),
        stalled=None
        if mapping.get("stalled_letter") is None
        else Stall(
            mapping["stalled_letter"], mapping["stalled_reason"] or "", mapping["stalled_at"]
        ),
        traceparent=mapping.get("traceparent"),
    )


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
