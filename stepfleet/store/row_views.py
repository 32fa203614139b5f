"""Rows to records, by column name: shared by PgStore (SQLAlchemy rows, through their
`_mapping`) and the direct reads of `stepfleet status` (psycopg's dict rows), so that both
build the same records from the same columns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stepfleet.schemas import (
    EntryFlags,
    EntryKind,
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    RunMode,
    Waiting,
    WaitKind,
)
from stepfleet.store.records import HeldEvent, InstanceRecord, Stall

Columns = Mapping[Any, Any]
"""A row by column name (SQLAlchemy's RowMapping is keyed by columns too)."""


def instance_record(row: Columns) -> InstanceRecord:
    """An instance record from a row of `instances` that has at least the locked columns."""
    waiting = None
    if row["wait_kind"] is not None:
        waiting = Waiting(
            WaitKind(row["wait_kind"]),
            row["wait_name"],
            row["wake_at"],
            row["wait_event"],
            row["wait_timeout_ms"],
        )
    return InstanceRecord(
        key=InstanceKey(row["tenant"], row["id"]),
        module=row["module"],
        status=InstanceStatus(row["status"]),
        position=row["position"],
        generation=row["generation"],
        attempt=row["attempt"],
        waiting=waiting,
        mode=RunMode(row["mode"]),
        end_status=InstanceStatus(row["end_status"]) if row["end_status"] else None,
        state_bytes=row["state_bytes"],
        output=row.get("output"),
        error=row["error"],
        created_at=row.get("created_at"),
        updated_at=row.get("updated_at"),
        finished_at=row.get("finished_at"),
        retain_until=row.get("retain_until"),
        stalled=None
        if row.get("stalled_letter") is None
        else Stall(row["stalled_letter"], row["stalled_reason"] or "", row["stalled_at"]),
        traceparent=row.get("traceparent"),
    )


def journal_entry(row: Columns) -> JournalEntry:
    """A journal entry from a row of `journal`."""
    return JournalEntry(
        seq=row["seq"],
        kind=EntryKind(row["kind"]),
        name=row["name"],
        value=row["value"],
        attempt=row["attempt"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        flags=EntryFlags(row["flags"]),
    )


def failed_attempt(row: Columns) -> FailedAttempt:
    """A failed attempt from a row of `step_attempts`."""
    return FailedAttempt(
        row["seq"], row["name"], row["attempt"], row["error"], row["started_at"], row["finished_at"]
    )


def held_event(row: Columns) -> HeldEvent:
    """A held early event from a row of `early_events`."""
    return HeldEvent(row["event_id"], row["type"], row["received_at"], row["expires_at"])
