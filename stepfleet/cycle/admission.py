"""Admission: which messages of a batch run a step, and what happens to the others.

Creates insert their instance (once); events are stored, repeats recognised; every
instance is locked in key order; then `engine.admit` judges each message against its
instance's state.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Generic

import structlog

from stepfleet.cycle.context import message_context
from stepfleet.cycle.replays import CachedReplay
from stepfleet.cycle.work import CycleResult, H, Rejected, Work, state_of
from stepfleet.engine import Admit, Duplicate, Keep, Reject, admit, check_size
from stepfleet.sandbox import ReplayJournal
from stepfleet.schemas import CreateBody, DeadReason, EventBody
from stepfleet.store import NewEvent, NewInstance
from stepfleet.store.port import StepTx

log = structlog.get_logger("stepfleet.worker")


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class Admission(Generic[H]):
    """Admits one batch inside its transaction; fills `result` with what it turns away."""

    def __init__(self, tx: StepTx, result: CycleResult[H], *, value_bytes: int) -> None:
        self._tx = tx
        self._result = result
        self._value_bytes = value_bytes

    async def admit(self, works: list[Work[H]], now: datetime) -> list[Work[H]]:
        """Return the works that run a step now, each with its locked record and state."""
        live = await self._create(works)
        records = await self._tx.lock_instances(w.key for w in live)
        admitted: list[Work[H]] = []
        events: list[NewEvent] = []
        finished_events: list[tuple[Work[H], Reject, str]] = []
        for work in live:
            record = records.get(work.key)
            state = None if record is None else state_of(record)
            verdict = admit(work.envelope, state, created_now=work.key in self._created, now=now)
            body = work.envelope.body
            if isinstance(body, EventBody) and isinstance(verdict, Admit | Keep):
                assert state is not None
                consumed = state.position if isinstance(verdict, Admit) else None
                events.append(
                    NewEvent(work.key, body.event_id, body.type, _json(body.payload), consumed)
                )
            if isinstance(verdict, Admit):
                assert state is not None
                work.record = record
                work.state = replace(state, waiting=None) if verdict.woken else state
                work.pending = () if verdict.resolution is None else (verdict.resolution,)
                admitted.append(work)
            elif isinstance(verdict, Duplicate):
                self._duplicate(work, verdict.why)
            elif isinstance(verdict, Reject):
                if isinstance(body, EventBody) and verdict.reason is DeadReason.INSTANCE_FINISHED:
                    finished_events.append((work, verdict, body.event_id))  # or a repeat
                else:
                    self._reject(work, verdict.reason, verdict.detail)
            else:
                with message_context(work):
                    event_type = body.type if isinstance(body, EventBody) else None
                    log.info("event_stored", event_type=event_type)
        if finished_events:
            known = await self._tx.known_events([(w.key, event) for w, _, event in finished_events])
            for work, verdict, _ in finished_events:
                if work.key in known:
                    self._duplicate(work, "event already delivered")
                else:
                    self._reject(work, verdict.reason, verdict.detail)
        if events:
            fresh = await self._tx.insert_events(events)
            repeats = {e.key for e in events if e.key not in fresh}
            for work in [w for w in admitted if w.key in repeats]:
                admitted.remove(work)
                self._duplicate(work, "event already received")
        return admitted

    async def _create(self, works: list[Work[H]]) -> list[Work[H]]:
        """Insert the instances creates ask for; return the works that go on to be judged."""
        creates = [w for w in works if isinstance(w.envelope.body, CreateBody)]
        owned = await self._tx.owned_modules({(w.key.tenant, w.module) for w in creates})
        live: list[Work[H]] = []
        new: list[NewInstance] = []
        for work in works:
            body = work.envelope.body
            if isinstance(body, CreateBody):
                if (work.key.tenant, work.module) not in owned:
                    detail = f"module {work.module} was never pushed for tenant {work.key.tenant}"
                    self._reject(work, DeadReason.UNKNOWN_MODULE, detail)
                    continue
                params = _json(body.params)
                if (over := check_size("params", params, self._value_bytes)) is not None:
                    self._reject(work, over.reason, over.detail)
                    continue
                new.append(NewInstance(work.key, work.module, params, body.retention_seconds))
                work.replay = CachedReplay(0, params, ReplayJournal())
            elif isinstance(body, EventBody):
                payload = _json(body.payload)
                if (over := check_size("event payload", payload, self._value_bytes)) is not None:
                    self._reject(work, over.reason, over.detail)
                    continue
            live.append(work)
        self._created = await self._tx.create_instances(new)
        return live

    def _reject(self, work: Work[H], reason: DeadReason, detail: str) -> None:
        self._result.rejected.append(Rejected(work, reason, detail))

    def _duplicate(self, work: Work[H], why: str) -> None:
        self._result.duplicates.append(work)
        with message_context(work):
            log.info("duplicate_ignored", kind=work.envelope.kind.value, why=why)
