"""The dead-letter archive and the audit log: what operators search, replay and purge.

A dead letter is in exactly one place: the dead-letter queue until a worker archives it (the
insert commits before the ack, and the letter's key makes a redelivered one a no-op), then
this table; a replay marks the row and queues the message in the outbox in one transaction,
so it is published once however often the replay is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from stepfleet.store.dead_letter_records import Archived, DeadLetter, LetterFilter, NewDeadLetter
from stepfleet.store.dead_letter_text import (
    headers_json,
    routing_headers,
    storable_letter,
    storable_text,
)
from stepfleet.store.dead_letter_usage import account_name, add_usage, letter_accounts, lock_usage
from stepfleet.store.errors import translated
from stepfleet.store.records import AuditEntry
from stepfleet.store.tables import audit_log, dead_letters

# The instance a letter is about, as it stands when the letter is archived.
_CONTEXT = text(
    """
    SELECT i.tenant, i.id, i.module, i.status, i.position, i.attempt, i.error,
           coalesce((SELECT json_agg(json_build_object(
                        'seq', a.seq, 'step', a.name, 'attempt', a.attempt, 'error', a.error,
                        'at', a.finished_at) ORDER BY a.seq, a.attempt)
                     FROM step_attempts AS a
                     WHERE a.tenant = i.tenant AND a.instance_id = i.id), '[]') AS attempts,
           (SELECT j.name FROM journal AS j WHERE j.tenant = i.tenant AND j.instance_id = i.id
            ORDER BY j.seq DESC LIMIT 1) AS last_step
    FROM instances AS i
    WHERE (i.tenant, i.id) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])))
    """
)


class DeadLetterStore:
    """Archive, search and purge dead letters; read the audit log."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def archive(
        self, letters: Sequence[NewDeadLetter], *, account_bytes: int | None = None
    ) -> Archived:
        """Store letters with their workflow context.

        `account_bytes` bounds what the letters of one account (tenant) keep of bodies and
        headers: past it a letter keeps its metadata, reason and routing headers only, and is
        marked unreplayable.
        """
        if not letters:
            return Archived()
        async with translated(), self._engine.begin() as connection:
            safe = [storable_letter(letter) for letter in letters]
            contexts = await _contexts(connection, safe)
            accounts = await letter_accounts(connection, safe)
            usage = await lock_usage(connection, accounts)
            rows = []
            stripped: dict[str, NewDeadLetter] = {}
            for original, letter, account in zip(letters, safe, accounts, strict=True):
                context = contexts.get((letter.tenant or "", letter.instance_id or ""), {})
                headers = headers_json(letter.headers)
                body = letter.body
                unreplayable = letter.unreplayable
                stored = len(body) + len(headers)
                if account_bytes is not None and usage[account] + stored > account_bytes:
                    headers = headers_json(routing_headers(letter.headers))
                    body = b""
                    unreplayable = (
                        f"the archive of {account_name(account)} was over its bound of "
                        f"{account_bytes} bytes: only the letter's metadata were kept"
                    )
                    stored = len(headers)
                    stripped[letter.letter_key] = original
                usage[account] += stored
                rows.append(
                    {
                        "letter_key": letter.letter_key,
                        "reason": letter.reason,
                        "detail": letter.detail,
                        "tenant": letter.tenant,
                        "instance_id": letter.instance_id,
                        "kind": letter.kind,
                        "module": letter.module or context.get("module"),
                        "routing_key": letter.routing_key,
                        "message_id": letter.message_id,
                        "headers": headers,
                        "body": body,
                        "context": json.dumps(context, default=str),
                        "source": letter.source,
                        "sender": letter.sender,
                        "first_exchange": letter.first_exchange,
                        "account": account,
                        "body_size": letter.body_size,
                        "body_sha256": letter.body_sha256,
                        "stored_bytes": stored,
                        "unreplayable": unreplayable,
                    }
                )
            result = await connection.execute(
                insert(dead_letters)
                .values(rows)
                .on_conflict_do_nothing(constraint="uq_dead_letters_letter_key")
                .returning(
                    dead_letters.c.letter_key, dead_letters.c.account, dead_letters.c.stored_bytes
                )
            )
            inserted = result.all()
            await add_usage(connection, ((r.account, 1, r.stored_bytes) for r in inserted))
            return Archived(
                new=len(inserted),
                stripped=[stripped[r.letter_key] for r in inserted if r.letter_key in stripped],
            )

    async def find(self, letter_filter: LetterFilter) -> list[DeadLetter]:
        """The archived letters the filter selects, oldest first."""
        query = _where(select(dead_letters), letter_filter).order_by(dead_letters.c.id)
        if letter_filter.limit:
            query = query.limit(letter_filter.limit)
        async with translated(), self._engine.connect() as connection:
            return [_letter(row) for row in await connection.execute(query)]

    async def count(self, letter_filter: LetterFilter) -> int:
        query = _where(select(func.count()).select_from(dead_letters), letter_filter)
        async with translated(), self._engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())

    async def audit_entries(
        self, *, limit: int = 100, action: str | None = None
    ) -> list[AuditEntry]:
        """The newest audit entries first."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if action:
            query = query.where(audit_log.c.action == action)
        async with translated(), self._engine.connect() as connection:
            return [
                AuditEntry(
                    actor=row.actor,
                    action=row.action,
                    target=row.target,
                    filter=json.loads(row.filter),
                    count=row._mapping["count"],
                    detail=row.detail,
                    at=row.at,
                )
                for row in await connection.execute(query)
            ]


async def claim_for_replay(
    connection: AsyncConnection, ids: Sequence[int], actor: str
) -> list[DeadLetter]:
    """Mark archived letters replayed (those not replayed yet) and return them."""
    result = await connection.execute(
        update(dead_letters)
        .where(dead_letters.c.id.in_(list(ids)), dead_letters.c.replayed_at.is_(None))
        .values(replayed_at=func.now(), replayed_by=actor)
        .returning(*dead_letters.c)
    )
    return sorted((_letter(row) for row in result), key=lambda letter: letter.id)


async def purge(connection: AsyncConnection, ids: Sequence[int]) -> int:
    """Delete archived letters for good, giving their bytes back to their accounts."""
    result = await connection.execute(
        delete(dead_letters)
        .where(dead_letters.c.id.in_(list(ids)))
        .returning(dead_letters.c.account, dead_letters.c.stored_bytes)
    )
    deleted = result.all()
    await add_usage(connection, ((r.account, -1, -r.stored_bytes) for r in deleted))
    return len(deleted)


async def _contexts(
    connection: AsyncConnection, letters: Sequence[NewDeadLetter]
) -> dict[tuple[str, str], dict[str, Any]]:
    keys = {(d.tenant, d.instance_id) for d in letters if d.tenant and d.instance_id}
    if not keys:
        return {}
    listed = list(keys)
    result = await connection.execute(
        _CONTEXT, {"tenants": [k[0] for k in listed], "ids": [k[1] for k in listed]}
    )
    return {
        (row.tenant, row.id): {
            "module": row.module,
            "status": row.status,
            "position": row.position,
            "attempt": row.attempt,
            "error": row.error,
            "last_step": row.last_step,
            "failed_attempts": row.attempts if isinstance(row.attempts, list) else [],
        }
        for row in result
    }


def _where(query: Select[Any], f: LetterFilter) -> Select[Any]:
    c = dead_letters.c
    if f.ids:
        query = query.where(c.id.in_(list(f.ids)))
    if f.tenant:
        query = query.where(c.tenant == f.tenant)
    if f.reason:
        query = query.where(c.reason == f.reason)
    if f.instance_id:
        query = query.where(c.instance_id == f.instance_id)
    if f.since:
        query = query.where(c.received_at >= f.since)
    if f.until:
        query = query.where(c.received_at < f.until)
    if not f.include_replayed:
        query = query.where(c.replayed_at.is_(None))
    return query


def _letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        received_at=row.received_at,
        reason=row.reason,
        detail=row.detail,
        tenant=row.tenant,
        instance_id=row.instance_id,
        kind=row.kind,
        module=row.module,
        routing_key=row.routing_key,
        message_id=row.message_id,
        headers=json.loads(row.headers),
        body=bytes(row.body),
        context=json.loads(row.context),
        replayed_at=row.replayed_at,
        replayed_by=row.replayed_by,
        source=row.source,
        sender=row.sender,
        first_exchange=row.first_exchange,
        account=row.account,
        body_size=row.body_size,
        body_sha256=row.body_sha256,
        unreplayable=row.unreplayable,
    )


# The records and `storable_text` live in their own modules; they stay importable from here.
__all__ = [
    "Archived",
    "DeadLetter",
    "DeadLetterStore",
    "LetterFilter",
    "NewDeadLetter",
    "claim_for_replay",
    "purge",
    "storable_text",
]
