"""The dead-letter archive and the audit log: what operators search, replay and purge.

A dead letter is in exactly one place: the dead-letter queue until a worker archives it (the
insert commits before the ack, and the letter's key makes a redelivered one a no-op), then
this table; a replay marks the row and queues the message in the outbox in one transaction,
so it is published once however often the replay is asked for.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import bindparam, delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from stepfleet.schemas import InstanceKey, MessageKind
from stepfleet.store.dead_letter_rows import (
    Archived,
    DeadLetter,
    LetterFilter,
    NewDeadLetter,
    Stalled,
    account_name,
    filtered,
    headers_json,
    letter_from_row,
    routing_headers,
    storable,
    storable_text,
)
from stepfleet.store.errors import translated
from stepfleet.store.records import AuditEntry, InstanceRecord
from stepfleet.store.rows import record_from_row
from stepfleet.store.tables import audit_log, dead_letter_usage, dead_letters, instances, tenants

StallCheck = Callable[[NewDeadLetter, InstanceRecord], bool]
"""Whether a letter held the next step of the instance as it stands now (the archiver's
judge: the engine's admission says whether the letter would run if it were delivered now)."""

_STALL_KINDS = frozenset({MessageKind.STEP.value, MessageKind.WAKE.value})

_MARK_STALLED = text(
    """
    UPDATE instances SET stalled_letter = :letter, stalled_reason = :reason, stalled_at = now()
    WHERE tenant = :tenant AND id = :id AND stalled_letter IS NULL
    RETURNING stalled_at
    """
)

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
        self,
        letters: Sequence[NewDeadLetter],
        *,
        account_bytes: int | None = None,
        stalls: StallCheck | None = None,
    ) -> Archived:
        """Store letters with their workflow context.

        `account_bytes` bounds what the letters of one account (tenant) keep of bodies and
        headers: past it a letter keeps its metadata, reason and routing headers only, and is
        marked unreplayable. With `stalls`, the same transaction locks the instances that
        step and wake letters name and marks those the check finds stalled by their letter
        (an instance already marked keeps its first letter).
        """
        if not letters:
            return Archived()
        async with translated(), self._engine.begin() as connection:
            safe = [storable(letter) for letter in letters]
            contexts = await _contexts(connection, safe)
            accounts = await _accounts(connection, safe)
            usage = await _lock_usage(connection, accounts)
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
            await _add_usage(connection, ((r.account, 1, r.stored_bytes) for r in inserted))
            return Archived(
                new=len(inserted),
                stripped=[stripped[r.letter_key] for r in inserted if r.letter_key in stripped],
                stalled=[] if stalls is None else await _mark_stalled(connection, safe, stalls),
            )

    async def find(self, letter_filter: LetterFilter) -> list[DeadLetter]:
        """The archived letters the filter selects, oldest first."""
        query = filtered(select(dead_letters), letter_filter).order_by(dead_letters.c.id)
        if letter_filter.limit:
            query = query.limit(letter_filter.limit)
        async with translated(), self._engine.connect() as connection:
            return [letter_from_row(row) for row in await connection.execute(query)]

    async def count(self, letter_filter: LetterFilter) -> int:
        query = filtered(select(func.count()).select_from(dead_letters), letter_filter)
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
    return sorted((letter_from_row(row) for row in result), key=lambda letter: letter.id)


async def purge(connection: AsyncConnection, ids: Sequence[int]) -> int:
    """Delete archived letters for good, giving their bytes back to their accounts."""
    result = await connection.execute(
        delete(dead_letters)
        .where(dead_letters.c.id.in_(list(ids)))
        .returning(dead_letters.c.account, dead_letters.c.stored_bytes)
    )
    deleted = result.all()
    await _add_usage(connection, ((r.account, -1, -r.stored_bytes) for r in deleted))
    return len(deleted)


async def _mark_stalled(
    connection: AsyncConnection, letters: Sequence[NewDeadLetter], check: StallCheck
) -> list[Stalled]:
    """Mark the instances whose next step or wake is one of these letters (not replayed yet:
    a redelivered letter finds its row from before)."""
    named = [
        letter
        for letter in letters
        if letter.kind in _STALL_KINDS and letter.tenant and letter.instance_id
    ]
    if not named:
        return []
    rows = await connection.execute(
        select(dead_letters.c.letter_key, dead_letters.c.id).where(
            dead_letters.c.letter_key.in_([letter.letter_key for letter in named]),
            dead_letters.c.replayed_at.is_(None),
        )
    )
    ids = {row.letter_key: row.id for row in rows}
    keys = sorted({(letter.tenant or "", letter.instance_id or "") for letter in named})
    locked = await connection.execute(
        select(instances)
        .where(tuple_(instances.c.tenant, instances.c.id).in_(keys))
        .order_by(instances.c.tenant, instances.c.id)
        .with_for_update()
    )
    records = {
        (record.key.tenant, record.key.instance_id): record
        for record in map(record_from_row, locked)
    }
    marked: list[Stalled] = []
    for letter in named:
        record = records.get((letter.tenant or "", letter.instance_id or ""))
        letter_id = ids.get(letter.letter_key)
        if record is None or letter_id is None or record.stalled is not None:
            continue
        if not check(letter, record):
            continue
        key: InstanceKey = record.key
        result = await connection.execute(
            _MARK_STALLED,
            {
                "letter": letter_id,
                "reason": letter.reason,
                "tenant": key.tenant,
                "id": key.instance_id,
            },
        )
        if result.first() is not None:
            marked.append(Stalled(letter, letter_id, record))
            records.pop((key.tenant, key.instance_id))
    return marked


async def _accounts(connection: AsyncConnection, letters: Sequence[NewDeadLetter]) -> list[str]:
    """The account of each letter: its own, or the tenant of its producer user, or ''."""
    users = {letter.account_user for letter in letters if letter.account_user}
    owners: dict[str, str] = {}
    if users:
        result = await connection.execute(
            select(tenants.c.broker_user, tenants.c.name).where(
                tenants.c.broker_user.in_(sorted(users))
            )
        )
        owners = {row.broker_user: row.name for row in result}
    return [
        owners.get(letter.account_user, "") if letter.account_user else letter.account or ""
        for letter in letters
    ]


async def _lock_usage(connection: AsyncConnection, accounts: Iterable[str]) -> dict[str, int]:
    """Lock the accounts' usage rows (made if missing, in one order: no deadlocks between
    archivers) and return the bytes each holds."""
    names = sorted(set(accounts))
    u = dead_letter_usage.c
    await connection.execute(
        insert(dead_letter_usage).values([{"account": n} for n in names]).on_conflict_do_nothing()
    )
    result = await connection.execute(
        select(u.account, u.bytes).where(u.account.in_(names)).order_by(u.account).with_for_update()
    )
    return {row.account: int(row.bytes) for row in result}


async def _add_usage(connection: AsyncConnection, changes: Iterable[tuple[str, int, int]]) -> None:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for account, letters, size in changes:
        totals[account][0] += letters
        totals[account][1] += size
    if not totals:
        return
    u = dead_letter_usage.c
    await connection.execute(
        update(dead_letter_usage)
        .where(u.account == bindparam("acc"))
        .values(letters=u.letters + bindparam("n"), bytes=u.bytes + bindparam("b")),
        [{"acc": a, "n": n, "b": b} for a, (n, b) in sorted(totals.items())],
    )


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


__all__ = [
    "Archived",
    "DeadLetter",
    "DeadLetterStore",
    "LetterFilter",
    "NewDeadLetter",
    "StallCheck",
    "Stalled",
    "claim_for_replay",
    "purge",
    "storable_text",
]
