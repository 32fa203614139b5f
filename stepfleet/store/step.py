"""StepTransaction: one PostgreSQL transaction of the per-step path.

Every statement takes arrays (`unnest`), so a batch of deliveries costs a handful of round
trips whatever its size.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from stepfleet.schemas import InstanceKey, JournalEntry, Waiting
from stepfleet.store import statements as sql
from stepfleet.store.records import (
    EarlyEvent,
    EarlyHolding,
    GuardedCreate,
    GuardedWrite,
    InstanceRecord,
    NewEvent,
    NewInstance,
    OutboxMessage,
    StepWrite,
    within_share,
)
from stepfleet.store.rows import (
    delete_outbox,
    entry_from_row,
    module_bytes,
    record_from_row,
    split_keys,
    take_events,
)


def _waiting_columns(waiting: Waiting | None) -> dict[str, Any]:
    if waiting is None:
        return {"kind": None, "name": None, "event": None, "timeout": None, "wake_at": None}
    return {
        "kind": waiting.kind.value,
        "name": waiting.name,
        "event": waiting.event_type,
        "timeout": waiting.timeout_ms,
        "wake_at": waiting.wake_at,
    }


class StepTransaction:
    """One transaction of the per-step path, covering a whole batch of deliveries."""

    def __init__(self, connection: AsyncConnection, *, retention_seconds: int) -> None:
        self._conn = connection
        self._retention = retention_seconds

    async def create_instances(self, new: Sequence[NewInstance]) -> set[InstanceKey]:
        """Insert instances that do not exist yet; return the keys actually inserted. Takes
        the instances' advisory locks first (see `hold_early_events`)."""
        if not new:
            return set()
        result = await self._conn.execute(
            sql.INSERT_INSTANCES,
            {
                **split_keys(n.key for n in new),
                "modules": [n.module for n in new],
                "params": [n.params for n in new],
                "retentions": [n.retention_seconds for n in new],
            },
        )
        return {InstanceKey(row.tenant, row.id) for row in result}

    async def lock_instances(
        self, keys: Iterable[InstanceKey]
    ) -> dict[InstanceKey, InstanceRecord]:
        """Lock the rows (in key order, so batches never deadlock) and return them."""
        result = await self._conn.execute(sql.LOCK_INSTANCES, split_keys(keys))
        return {InstanceKey(row.tenant, row.id): record_from_row(row) for row in result}

    async def owned_modules(self, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Return which (tenant, digest) pairs the tenant has pushed."""
        if not pairs:
            return set()
        listed = list(pairs)
        result = await self._conn.execute(
            sql.OWNED_MODULES,
            {"tenants": [p[0] for p in listed], "digests": [p[1] for p in listed]},
        )
        return {(row.tenant, row.digest) for row in result}

    async def module_bytes(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Return the bytes of the stored modules among `digests`."""
        return await module_bytes(self._conn, digests)

    async def replay_data(
        self, since: dict[InstanceKey, int], *, with_params: Iterable[InstanceKey]
    ) -> tuple[dict[InstanceKey, str], dict[InstanceKey, list[JournalEntry]]]:
        """Return params for `with_params` and the journal of each key from its position on."""
        params: dict[InstanceKey, str] = {}
        wanted = list(with_params)
        if wanted:
            result = await self._conn.execute(sql.PARAMS, split_keys(wanted))
            params = {InstanceKey(row.tenant, row.id): row.params for row in result}
        entries: dict[InstanceKey, list[JournalEntry]] = {key: [] for key in since}
        if since:
            result = await self._conn.execute(
                sql.JOURNAL_SINCE, {**split_keys(since), "froms": list(since.values())}
            )
            for row in result:
                entries[InstanceKey(row.tenant, row.instance_id)].append(entry_from_row(row))
        return params, entries

    async def grant_slots(self, tenant: str, cap: int, need: int) -> int:
        """Take up to `need` of a tenant's `cap` running-step slots until commit.

        A slot is the advisory lock (the tenant's `slot_key`, slot number); a tenant without a
        row has no limits, so none."""
        result = await self._conn.execute(
            sql.GRANT_SLOTS, {"tenant": tenant, "cap": cap, "need": need}
        )
        return int(result.scalar_one())

    async def take_tokens(self, tenant: str, per_second: float, need: int) -> float:
        """Take `need` tokens of the tenant's shared bucket; return the tokens there were.

        The first whole tokens there were are spent now; the rest are taken from the future,
        so a step held back is already paid for when its turn comes.
        """
        result = await self._conn.execute(
            sql.TAKE_TOKENS, {"tenant": tenant, "rate": per_second, "need": need}
        )
        return float(result.scalar_one())

    async def known_events(self, events: Sequence[tuple[InstanceKey, str]]) -> set[InstanceKey]:
        """Of (instance, event id) pairs, the instances that already received that event."""
        if not events:
            return set()
        result = await self._conn.execute(
            sql.KNOWN_EVENTS,
            {**split_keys(k for k, _ in events), "event_ids": [e for _, e in events]},
        )
        return {InstanceKey(row.tenant, row.instance_id) for row in result}

    async def insert_events(self, events: Sequence[NewEvent]) -> set[InstanceKey]:
        """Store events; return the keys whose event was new (the rest are repeats)."""
        if not events:
            return set()
        result = await self._conn.execute(
            sql.INSERT_EVENTS,
            {
                **split_keys(e.key for e in events),
                "event_ids": [e.event_id for e in events],
                "types": [e.type for e in events],
                "payloads": [e.payload for e in events],
                "consumed": [e.consumed_seq for e in events],
            },
        )
        return {InstanceKey(row.tenant, row.instance_id) for row in result}

    async def hold_early_events(
        self,
        early: Sequence[EarlyEvent],
        *,
        hold_seconds: float,
        tenant_bytes: int | None = None,
    ) -> EarlyHolding:
        """Hold events whose instance does not exist, for `hold_seconds`, each tenant's up to
        `tenant_bytes` held at once; report the keys whose instance exists after all (its
        create committed meanwhile) and the events refused for their tenant's share: those
        are not held.

        The instances' advisory locks (also taken by `create_instances`) make this and a
        create of the same instance serialise: a create that commits first is seen here, one
        that commits later finds the held event. Two workers holding a tenant's events at
        once may each fill the rest of its share, so it is kept within a batch or two.
        """
        if not early:
            return EarlyHolding()
        keys = split_keys(e.event.key for e in early)
        await self._conn.execute(sql.LOCK_INSTANCE_KEYS, keys)
        existing = {
            InstanceKey(row.tenant, row.id)
            for row in await self._conn.execute(sql.EXISTING_INSTANCES, keys)
        }
        candidates = [e for e in early if e.event.key not in existing]
        held, refused = await self._within_share(candidates, tenant_bytes)
        if held:
            await self._conn.execute(
                sql.HOLD_EARLY_EVENTS,
                {
                    **split_keys(e.event.key for e in held),
                    "event_ids": [e.event.event_id for e in held],
                    "types": [e.event.type for e in held],
                    "payloads": [e.event.payload for e in held],
                    "exchanges": [e.letter.exchange or "" for e in held],
                    "keys": [e.letter.routing_key for e in held],
                    "headers": [e.letter.headers for e in held],
                    "bodies": [e.letter.body for e in held],
                    "hold": hold_seconds,
                },
            )
        return EarlyHolding(existing, refused)

    async def _within_share(
        self, candidates: Sequence[EarlyEvent], tenant_bytes: int | None
    ) -> tuple[list[EarlyEvent], list[EarlyEvent]]:
        if tenant_bytes is None or not candidates:
            return list(candidates), []
        tenants = sorted({e.event.key.tenant for e in candidates})
        used = {
            row.tenant: int(row.bytes)
            for row in await self._conn.execute(sql.HELD_BYTES, {"tenants": tenants})
        }
        already = {
            (InstanceKey(row.tenant, row.instance_id), row.event_id)
            for row in await self._conn.execute(
                sql.ALREADY_HELD,
                {
                    **split_keys(e.event.key for e in candidates),
                    "event_ids": [e.event.event_id for e in candidates],
                },
            )
        }
        return within_share(candidates, used, already, tenant_bytes)

    async def adopt_early_events(self, keys: Sequence[InstanceKey]) -> int:
        """Turn the events held for instances this transaction has just inserted into stored
        events (arrival times kept); return how many. `create_instances` took their locks, so
        this statement sees every event held before."""
        if not keys:
            return 0
        return len((await self._conn.execute(sql.ADOPT_EARLY_EVENTS, split_keys(keys))).all())

    async def take_events(
        self, waits: Sequence[tuple[InstanceKey, str, int]]
    ) -> dict[InstanceKey, tuple[str, datetime]]:
        """For each (instance, event type, position) wait, take the oldest stored event.

        Returns the payload and arrival time of each event taken, by instance.
        """
        return await take_events(self._conn, waits)

    async def write_batch(
        self,
        writes: Sequence[StepWrite],
        outbox: Sequence[OutboxMessage],
        *,
        confirmed_outbox: Sequence[int] = (),
    ) -> list[int]:
        """Write a batch's journal entries, attempts, instance states and outbox rows at once.

        Also deletes `confirmed_outbox` (rows whose publish the broker confirmed earlier).
        Returns the new outbox ids in the order of `outbox`.
        """
        if not writes and not outbox and not confirmed_outbox:
            return []
        result = await self._conn.execute(
            sql.WRITE_BATCH,
            _batch_params(writes, outbox, confirmed_outbox, self._retention),
        )
        # INSERT ... SELECT FROM unnest keeps the input order for a serial id.
        return sorted(row.id for row in result)

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget messages whose publish the broker confirmed."""
        await delete_outbox(self._conn, ids)


def _batch_params(
    writes: Sequence[StepWrite],
    outbox: Sequence[OutboxMessage],
    confirmed: Sequence[int],
    retention: int,
) -> dict[str, Any]:
    entries = [(w.key, e) for w in writes for e in w.entries]
    failures = [(w.key, f) for w in writes if (f := w.failed_attempt) is not None]
    waits = [_waiting_columns(w.waiting) for w in writes]
    return {
        "confirmed": list(confirmed),
        "retention": retention,
        "j_tenants": [k.tenant for k, _ in entries],
        "j_ids": [k.instance_id for k, _ in entries],
        "seqs": [e.seq for _, e in entries],
        "kinds": [int(e.kind) for _, e in entries],
        "names": [e.name for _, e in entries],
        "vals": [e.value for _, e in entries],
        "attempts": [e.attempt for _, e in entries],
        "starts": [e.started_at for _, e in entries],
        "ends": [e.finished_at for _, e in entries],
        "flags": [int(e.flags) for _, e in entries],
        "a_tenants": [k.tenant for k, _ in failures],
        "a_ids": [k.instance_id for k, _ in failures],
        "a_seqs": [f.seq for _, f in failures],
        "a_attempts": [f.attempt for _, f in failures],
        "a_names": [f.name for _, f in failures],
        "a_errors": [f.error for _, f in failures],
        "a_starts": [f.started_at for _, f in failures],
        "a_ends": [f.finished_at for _, f in failures],
        **split_keys(w.key for w in writes),
        "statuses": [w.status.value for w in writes],
        "positions": [w.position for w in writes],
        "u_attempts": [w.attempt for w in writes],
        "wait_kinds": [w["kind"] for w in waits],
        "wait_names": [w["name"] for w in waits],
        "wait_events": [w["event"] for w in waits],
        "wait_timeouts": [w["timeout"] for w in waits],
        "wake_ats": [w["wake_at"] for w in waits],
        "modes": [int(w.mode) for w in writes],
        "end_statuses": [w.end_status.value if w.end_status else None for w in writes],
        "outputs": [w.output for w in writes],
        "errors": [w.error for w in writes],
        "state_bytes": [w.state_bytes for w in writes],
        "traceparents": [w.traceparent for w in writes],
        "keys": [m.routing_key for m in outbox],
        "headers": [m.headers for m in outbox],
        "bodies": [m.body for m in outbox],
    }


def guarded_params(
    guarded: Sequence[GuardedWrite], confirmed: Sequence[int], retention: int
) -> dict[str, Any]:
    """The parameters of WRITE_UNCHANGED: the writes with their expected rows, their journal
    entries, failed attempts and next steps' outbox rows, each as one JSON document."""
    writes = [
        {
            **_state_json(w),
            "finishes": g.finishes,
            "x_module": x.module,
            "x_status": x.status.value,
            "x_position": x.position,
            "x_generation": x.generation,
            "x_attempt": x.attempt,
            "x_mode": int(x.mode),
            "x_end_status": x.end_status.value if x.end_status else None,
            "x_error": x.error,
            "x_state_bytes": x.state_bytes,
        }
        for g in guarded
        for w, x in [(g.write, g.expected)]
    ]
    return {
        "confirmed": list(confirmed),
        "retention": retention,
        "writes": json.dumps(writes),
        **_written_rows([(g.write, g.next_step) for g in guarded]),
    }


def created_params(
    creates: Sequence[GuardedCreate], confirmed: Sequence[int], retention: int
) -> dict[str, Any]:
    """The parameters of WRITE_CREATED: the new rows in their new states, their journal
    entries, failed attempts and next steps' outbox rows, each as one JSON document."""
    rows = [
        {
            **_state_json(w),
            "module": n.module,
            "params": n.params,
            "retention": n.retention_seconds,
            "final": w.status.is_final,
        }
        for c in creates
        for n, w in [(c.new, c.write)]
    ]
    return {
        "confirmed": list(confirmed),
        "retention": retention,
        "creates": json.dumps(rows),
        **_written_rows([(c.write, c.next_step) for c in creates]),
    }


def _state_json(w: StepWrite) -> dict[str, Any]:
    """The instance row's key and new state columns of a write, as the statements' JSON rows
    spell them (`_NEW_STATE`'s `u`)."""
    return {
        "tenant": w.key.tenant,
        "id": w.key.instance_id,
        "status": w.status.value,
        "position": w.position,
        "attempt": w.attempt,
        **_waiting_json(w.waiting),
        "mode": int(w.mode),
        "end_status": w.end_status.value if w.end_status else None,
        "output": w.output,
        "error": w.error,
        "state_bytes": w.state_bytes,
        "traceparent": w.traceparent,
    }


def _written_rows(
    written: Sequence[tuple[StepWrite, OutboxMessage | None]],
) -> dict[str, str]:
    """The journal entries, failed attempts and next steps' outbox rows of some writes, as
    the JSON documents of WRITE_UNCHANGED's and WRITE_CREATED's `entries`, `failures` and
    `queued`."""
    entries = [
        {
            "tenant": w.key.tenant,
            "instance_id": w.key.instance_id,
            "seq": e.seq,
            "kind": int(e.kind),
            "name": e.name,
            "value": e.value,
            "attempt": e.attempt,
            "started_at": _iso(e.started_at),
            "finished_at": _iso(e.finished_at),
            "flags": int(e.flags),
        }
        for w, _ in written
        for e in w.entries
    ]
    failures = [
        {
            "tenant": w.key.tenant,
            "instance_id": w.key.instance_id,
            "seq": f.seq,
            "attempt": f.attempt,
            "name": f.name,
            "error": f.error,
            "started_at": _iso(f.started_at),
            "finished_at": _iso(f.finished_at),
        }
        for w, _ in written
        if (f := w.failed_attempt) is not None
    ]
    queued = [
        {
            "tenant": w.key.tenant,
            "id": w.key.instance_id,
            "key": n.routing_key,
            "headers": n.headers,
            "body": base64.b64encode(n.body).decode(),
            "ord": ord_,
        }
        for ord_, (w, n) in enumerate(written)
        if n is not None
    ]
    return {
        "entries": json.dumps(entries),
        "failures": json.dumps(failures),
        "queued": json.dumps(queued),
    }


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _waiting_json(waiting: Waiting | None) -> dict[str, Any]:
    """The waiting columns of an instance row, as JSON values."""
    columns = _waiting_columns(waiting)
    return {
        "wait_kind": columns["kind"],
        "wait_name": columns["name"],
        "wait_event": columns["event"],
        "wait_timeout_ms": columns["timeout"],
        "wake_at": _iso(columns["wake_at"]),
    }
