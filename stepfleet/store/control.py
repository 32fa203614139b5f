"""Statements behind operator actions (pause, resume, terminate, restart, delete).

Each action runs in one transaction holding the instance's row lock, so it serialises with
the per-step path: a pause lands between two steps, never inside one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from stepfleet.schemas import InstanceKey, InstanceStatus, RunMode, Waiting
from stepfleet.store.dead_letters import DeadLetter, claim_for_replay, purge
from stepfleet.store.records import AuditEntry, InstanceRecord, OutboxMessage
from stepfleet.store.rows import STATE_COLUMNS, record_from_row, take_events

_LOCK = text(
    f"SELECT {STATE_COLUMNS} FROM instances WHERE tenant = :tenant AND id = :id FOR UPDATE"  # noqa: S608
)

_UPDATE = text(
    """
    UPDATE instances
    SET status = :status, position = :position, generation = :generation, attempt = :attempt,
        wait_kind = :wait_kind, wait_name = :wait_name, wait_event = :wait_event,
        wait_timeout_ms = :wait_timeout_ms, wake_at = :wake_at, wake_sent_at = NULL,
        mode = :mode, end_status = :end_status, output = :output, error = :error,
        updated_at = now(),
        stalled_letter = CASE WHEN :keep_stall THEN stalled_letter END,
        stalled_reason = CASE WHEN :keep_stall THEN stalled_reason END,
        stalled_at = CASE WHEN :keep_stall THEN stalled_at END,
        finished_at = CASE WHEN :status IN ('complete', 'errored', 'terminated')
                           THEN now() END,
        retain_until = CASE WHEN :status IN ('complete', 'errored', 'terminated')
            THEN now() + make_interval(secs => coalesce(retention_seconds, :retention)) END
    WHERE tenant = :tenant AND id = :id
    """
)

_LAST_FAILED_STEP = text(
    """
    SELECT max(seq) AS seq FROM journal
    WHERE tenant = :tenant AND instance_id = :id AND kind = 2
    """
)

# A retry keeps the failed step's last attempt in the attempt history, then forgets the
# journal from that step on.
_RETIRE_FAILED = (
    text(
        """
        INSERT INTO step_attempts (tenant, instance_id, seq, attempt, name, error,
                                   started_at, finished_at)
        SELECT tenant, instance_id, seq, attempt, name, value, started_at, finished_at
        FROM journal WHERE tenant = :tenant AND instance_id = :id AND seq = :seq AND kind = 2
        ON CONFLICT ON CONSTRAINT pk_step_attempts DO NOTHING
        RETURNING attempt
        """
    ),
    text("DELETE FROM journal WHERE tenant = :tenant AND instance_id = :id AND seq >= :seq"),
    text("DELETE FROM step_attempts WHERE tenant = :tenant AND instance_id = :id AND seq > :seq"),
    text(
        "UPDATE events SET consumed_seq = NULL "
        "WHERE tenant = :tenant AND instance_id = :id AND consumed_seq >= :seq"
    ),
)

_FIRST_STEP_NAMED = text(
    """
    SELECT min(seq) AS seq FROM journal
    WHERE tenant = :tenant AND instance_id = :id AND name = :name AND kind IN (1, 2, 3, 4, 5)
    """
)

_REWIND = (
    text("DELETE FROM journal WHERE tenant = :tenant AND instance_id = :id AND seq >= :seq"),
    text("DELETE FROM step_attempts WHERE tenant = :tenant AND instance_id = :id AND seq >= :seq"),
    text(
        "UPDATE events SET consumed_seq = NULL "
        "WHERE tenant = :tenant AND instance_id = :id AND consumed_seq >= :seq"
    ),
    text(
        """
        UPDATE instances SET state_bytes = octet_length(params) + coalesce((
            SELECT sum(octet_length(value)) FROM journal
            WHERE tenant = :tenant AND instance_id = :id), 0)
        WHERE tenant = :tenant AND id = :id
        """
    ),
)

_INSERT_OUTBOX = text(
    """
    INSERT INTO outbox (exchange, routing_key, headers, body)
    SELECT * FROM unnest(CAST(:exchanges AS text[]), CAST(:keys AS text[]),
                         CAST(:headers AS text[]), CAST(:bodies AS bytea[]))
    RETURNING id
    """
)

_HAS_EVENT = text(
    """
    SELECT EXISTS (SELECT 1 FROM events WHERE tenant = :tenant AND instance_id = :id
                   AND type = :type AND consumed_seq IS NULL)
    """
)

_HAS_ROLLBACKS = text(
    """
    SELECT EXISTS (SELECT 1 FROM journal WHERE tenant = :tenant AND instance_id = :id
                   AND kind = 1 AND flags & 1 = 1)
    """
)

_SET_MODULE = text(
    "UPDATE instances SET module = :module, updated_at = now() WHERE tenant = :tenant AND id = :id"
)

_AUDIT = text(
    """
    INSERT INTO audit_log (actor, action, target, filter, count, detail)
    VALUES (:actor, :action, :target, :filter, :count, :detail)
    """
)

_DELETE = text("DELETE FROM instances WHERE tenant = :tenant AND id = :id")

# A replayed letter takes its instance's stall with it: the instance gets its message again.
_CLEAR_STALLS = text(
    """
    UPDATE instances SET stalled_letter = NULL, stalled_reason = NULL, stalled_at = NULL
    WHERE stalled_letter = ANY(CAST(:ids AS bigint[]))
    RETURNING tenant, id
    """
)


class ControlTransaction:
    """One operator action on one instance, under its row lock."""

    def __init__(self, connection: AsyncConnection, *, retention_seconds: int) -> None:
        self._conn = connection
        self._retention = retention_seconds

    async def lock(self, key: InstanceKey) -> InstanceRecord | None:
        """Lock and return the instance, or None when it does not exist."""
        row = (await self._conn.execute(_LOCK, _key(key))).first()
        return None if row is None else record_from_row(row)

    async def update(
        self,
        record: InstanceRecord,
        *,
        status: InstanceStatus,
        waiting: Waiting | None,
        position: int | None = None,
        generation: int | None = None,
        attempt: int | None = None,
        mode: RunMode | None = None,
        end_status: InstanceStatus | None = None,
        output: str | None = None,
        error: str | None = None,
        keep_stall: bool = False,
    ) -> None:
        """Write the instance's new state; unnamed fields keep their value, output and error
        are replaced. A stall mark is cleared unless `keep_stall` (the action sends the
        instance on, or ends it)."""
        await self._conn.execute(
            _UPDATE,
            {
                **_key(record.key),
                "status": status.value,
                "position": record.position if position is None else position,
                "generation": record.generation if generation is None else generation,
                "attempt": record.attempt if attempt is None else attempt,
                "wait_kind": waiting.kind.value if waiting else None,
                "wait_name": waiting.name if waiting else None,
                "wait_event": waiting.event_type if waiting else None,
                "wait_timeout_ms": waiting.timeout_ms if waiting else None,
                "wake_at": waiting.wake_at if waiting else None,
                "mode": int(record.mode if mode is None else mode),
                "end_status": end_status.value if end_status else None,
                "output": output,
                "error": error,
                "retention": self._retention,
                "keep_stall": keep_stall,
            },
        )

    async def first_step_named(self, key: InstanceKey, name: str) -> int | None:
        """The journal position of the first step, sleep or wait called `name`, or None."""
        row = (await self._conn.execute(_FIRST_STEP_NAMED, {**_key(key), "name": name})).first()
        return None if row is None else row.seq

    async def last_failed_step(self, key: InstanceKey) -> int | None:
        """The journal position of the last step that failed for good, or None."""
        row = (await self._conn.execute(_LAST_FAILED_STEP, _key(key))).first()
        return None if row is None else row.seq

    async def retire_failed_step(self, key: InstanceKey, seq: int) -> int:
        """Move the step that failed for good at `seq` into its attempt history and forget
        the journal from there; return the attempt number it had."""
        retire, *rest = _RETIRE_FAILED
        row = (await self._conn.execute(retire, {**_key(key), "seq": seq})).first()
        for statement in rest:
            await self._conn.execute(statement, {**_key(key), "seq": seq})
        await self._conn.execute(_REWIND[-1], _key(key))  # state_bytes
        return 0 if row is None else int(row.attempt)

    async def rewind(self, key: InstanceKey, seq: int) -> None:
        """Forget the journal from `seq` on, with its attempts; events it consumed wait again."""
        for statement in _REWIND:
            await self._conn.execute(statement, {**_key(key), "seq": seq})

    async def take_event(
        self, key: InstanceKey, event_type: str, seq: int
    ) -> tuple[str, datetime] | None:
        """Take the oldest stored event of `event_type` for the wait at `seq`."""
        taken = await take_events(self._conn, [(key, event_type, seq)])
        return taken.get(key)

    async def has_event(self, key: InstanceKey, event_type: str) -> bool:
        """Tell whether a stored, undelivered event of `event_type` waits for the instance."""
        result = await self._conn.execute(_HAS_EVENT, {**_key(key), "type": event_type})
        return bool(result.scalar_one())

    async def has_rollbacks(self, key: InstanceKey) -> bool:
        """Tell whether a completed step of the instance registered a compensation."""
        return bool((await self._conn.execute(_HAS_ROLLBACKS, _key(key))).scalar_one())

    async def add_outbox(self, messages: Sequence[OutboxMessage]) -> list[int]:
        """Queue messages to publish after commit; return their ids."""
        if not messages:
            return []
        result = await self._conn.execute(
            _INSERT_OUTBOX,
            {
                "exchanges": [m.exchange for m in messages],
                "keys": [m.routing_key for m in messages],
                "headers": [m.headers for m in messages],
                "bodies": [m.body for m in messages],
            },
        )
        return sorted(row.id for row in result)

    async def set_module(self, key: InstanceKey, module: str) -> None:
        """Pin the instance to another module digest (an operator's code move)."""
        await self._conn.execute(_SET_MODULE, {**_key(key), "module": module})

    async def audit(self, entry: AuditEntry) -> None:
        """Record an operator action in the same transaction as the action itself."""
        await self._conn.execute(
            _AUDIT,
            {
                "actor": entry.actor,
                "action": entry.action,
                "target": entry.target,
                "filter": json.dumps(entry.filter, sort_keys=True, default=str),
                "count": entry.count,
                "detail": entry.detail,
            },
        )

    async def claim_letters(self, ids: Sequence[int], actor: str) -> list[DeadLetter]:
        """Mark dead letters replayed (those not replayed yet) and return them."""
        return await claim_for_replay(self._conn, ids, actor)

    async def clear_stalls(self, letter_ids: Sequence[int]) -> list[InstanceKey]:
        """Clear the stall marks these letters set; return the instances cleared."""
        if not letter_ids:
            return []
        result = await self._conn.execute(_CLEAR_STALLS, {"ids": list(letter_ids)})
        return [InstanceKey(row.tenant, row.id) for row in result]

    async def purge_letters(self, ids: Sequence[int]) -> int:
        """Delete archived dead letters; return how many."""
        return await purge(self._conn, ids)

    async def delete(self, key: InstanceKey) -> None:
        """Delete the instance with its journal, attempts and events."""
        await self._conn.execute(_DELETE, _key(key))


def _key(key: InstanceKey) -> dict[str, Any]:
    return {"tenant": key.tenant, "id": key.instance_id}
