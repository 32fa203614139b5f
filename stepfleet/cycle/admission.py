"""Admission: which messages of a batch run a step, and what happens to the others.

Every instance is locked in key order, then `engine.admit` judges each message against its
instance's state. Nothing is written here but events that wait for a later wait: a create's
row and an event that ends a wait are written with the run's outcome, so a run that stops at
an HTTP call (and is resumed by a later cycle) leaves no trace until it is decided.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Generic

import structlog

from stepfleet.cycle.context import message_context
from stepfleet.cycle.replays import CachedReplay
from stepfleet.cycle.work import CycleResult, H, Rejected, Work, state_of
from stepfleet.engine import Admit, Duplicate, InstanceState, Keep, Reject, admit, check_size
from stepfleet.sandbox import ReplayJournal
from stepfleet.schemas import CreateBody, DeadReason, EventBody, InstanceStatus
from stepfleet.store import EarlyEvent, NewEvent, OutboxMessage
from stepfleet.store.port import StepTx

log = structlog.get_logger("stepfleet.worker")

_OWNED_KEPT = 100_000
"""(tenant, module) pairs a worker remembers as pushed before it starts over."""


LetterOf = Callable[[H, DeadReason, str], OutboxMessage]
"""Builds the dead letter of a message (by its caller's handle) as an outbox row."""


class EarlyHold(Generic[H]):
    """How events for instances that do not exist yet are held: for `seconds`, with the
    dead letter `letter_of` builds queued if their instance never comes, and up to
    `tenant_bytes` of one tenant's at once (None: no limit); past that, an event is
    dead-lettered at once."""

    def __init__(
        self, seconds: float, letter_of: LetterOf[H], tenant_bytes: int | None = None
    ) -> None:
        self.seconds = seconds
        self.letter_of = letter_of
        self.tenant_bytes = tenant_bytes


def compact_json(value: object) -> str:
    """A value as the JSON text the store keeps (params, event payloads)."""
    return json.dumps(value, separators=(",", ":"))


class Admission(Generic[H]):
    """Admits one batch inside its transaction; fills `result` with what it turns away."""

    def __init__(
        self,
        tx: StepTx,
        result: CycleResult[H],
        *,
        value_bytes: int,
        owned: set[tuple[str, str]] | None = None,
        early: EarlyHold[H] | None = None,
    ) -> None:
        """`owned`: (tenant, digest) pairs known to be pushed, shared between batches (a
        module, once pushed, is never taken back), added to as creates find more. `early`:
        how to hold events that come before their instance (None: dead-letter them at once,
        `unknown-instance`)."""
        self._tx = tx
        self._early = early
        self._result = result
        self._value_bytes = value_bytes
        self._owned = set() if owned is None else owned
        self.kept_events: list[NewEvent] = []
        """Events for instances not waiting for them: stored for a later wait."""
        self._payloads: dict[int, str] = {}
        """Each event's payload as JSON text, made once when its size is checked."""

    async def admit(self, works: list[Work[H]], now: datetime) -> list[Work[H]]:
        """Return the works that run a step now, each with its state and (if it exists) its
        locked record."""
        live = await self._checked(works)
        records = await self._tx.lock_instances(w.key for w in live)
        admitted: list[Work[H]] = []
        events: list[tuple[Work[H], str, NewEvent | None, Reject | None]] = []
        early: list[Work[H]] = []
        for work in live:
            record = records.get(work.key)
            body = work.envelope.body
            state = None if record is None else state_of(record)
            if isinstance(body, CreateBody) and record is None:
                assert work.replay is not None
                state = InstanceState(
                    work.key,
                    work.module,
                    InstanceStatus.RUNNING,
                    0,
                    state_bytes=len(work.replay.params.encode()),
                )
                work.created = True
            verdict = admit(work.envelope, state, created_now=work.created, now=now)
            if isinstance(body, EventBody) and isinstance(verdict, Admit | Keep):
                assert state is not None
                consumed = state.position if isinstance(verdict, Admit) else None
                payload = self._payloads[id(work)]
                new = NewEvent(work.key, body.event_id, body.type, payload, consumed)
                events.append((work, body.event_id, new, None))
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
                    # Or a repeat of the event that finished it: known_events tells.
                    events.append((work, body.event_id, None, verdict))
                elif (
                    isinstance(body, EventBody)
                    and verdict.reason is DeadReason.UNKNOWN_INSTANCE
                    and self._early is not None
                    and self._early.seconds > 0
                ):
                    early.append(work)  # its create may not have committed yet
                else:
                    self._reject(work, verdict.reason, verdict.detail)
            else:
                with message_context(work):
                    event_type = body.type if isinstance(body, EventBody) else None
                    log.info("event_stored", event_type=event_type)
        if events:
            await self._sort_events(events, admitted)
        if early:
            await self._hold(early, now)
        return admitted

    async def _hold(self, works: list[Work[H]], now: datetime) -> None:
        """Hold events whose instance does not exist (yet), for their create to take."""
        assert self._early is not None
        hold = self._early
        held: list[EarlyEvent] = []
        for work in works:
            body = work.envelope.body
            assert isinstance(body, EventBody)
            detail = (
                f"no instance {work.key.instance_id!r} for this tenant: the event was held "
                f"from {now.isoformat()} for {hold.seconds:g} s and its instance was not "
                "created meanwhile"
            )
            event = NewEvent(work.key, body.event_id, body.type, self._payloads[id(work)])
            letter = hold.letter_of(work.handle, DeadReason.UNKNOWN_INSTANCE, detail)
            held.append(EarlyEvent(event, letter))
        holding = await self._tx.hold_early_events(
            held, hold_seconds=hold.seconds, tenant_bytes=hold.tenant_bytes
        )
        refused = {id(early) for early in holding.refused}
        for work, early in zip(works, held, strict=True):
            with message_context(work):
                if id(early) in refused:
                    log.warning("early_event_refused", tenant_bytes=hold.tenant_bytes)
                    detail = (
                        f"no instance {work.key.instance_id!r} for this tenant, and the events "
                        f"held for instances of the tenant not created yet already take its "
                        f"share of {hold.tenant_bytes} bytes (STEPFLEET_EARLY_EVENT_TENANT_BYTES):"
                        " the event was not held for its create"
                    )
                    self._reject(work, DeadReason.UNKNOWN_INSTANCE, detail)
                elif work.key in holding.existing:
                    self._result.again.append(work)
                    log.info("early_event_retried", why="instance created meanwhile")
                else:
                    self._result.early.append(work)
                    log.info("early_event_held", hold_seconds=hold.seconds)

    async def _sort_events(
        self,
        events: list[tuple[Work[H], str, NewEvent | None, Reject | None]],
        admitted: list[Work[H]],
    ) -> None:
        """A repeated event (its id already stored for the instance) is a duplicate; a new
        one is kept for a later wait, or ends the wait with the run."""
        known = await self._tx.known_events([(w.key, event_id) for w, event_id, _, _ in events])
        for work, _, new, refusal in events:
            if work.key in known:
                if new is not None and new.consumed_seq is not None:
                    admitted.remove(work)
                self._duplicate(
                    work, "event already received" if new else "event already delivered"
                )
            elif refusal is not None:
                self._reject(work, refusal.reason, refusal.detail)
            elif new is not None and new.consumed_seq is None:
                self.kept_events.append(new)
            else:
                work.new_event = new

    async def _checked(self, works: list[Work[H]]) -> list[Work[H]]:
        """Turn away creates of modules never pushed and values over the size limit."""
        asked = {(w.key.tenant, w.module) for w in works if isinstance(w.envelope.body, CreateBody)}
        if unknown := asked - self._owned:
            if len(self._owned) > _OWNED_KEPT:
                self._owned.clear()
            self._owned |= await self._tx.owned_modules(unknown)
        owned = self._owned
        live: list[Work[H]] = []
        for work in works:
            body = work.envelope.body
            if isinstance(body, CreateBody):
                if (work.key.tenant, work.module) not in owned:
                    detail = f"module {work.module} was never pushed for tenant {work.key.tenant}"
                    self._reject(work, DeadReason.UNKNOWN_MODULE, detail)
                    continue
                params = compact_json(body.params)
                if (over := check_size("params", params, self._value_bytes)) is not None:
                    self._reject(work, over.reason, over.detail)
                    continue
                work.replay = CachedReplay(0, params, ReplayJournal())
            elif isinstance(body, EventBody):
                payload = compact_json(body.payload)
                if (over := check_size("event payload", payload, self._value_bytes)) is not None:
                    self._reject(work, over.reason, over.detail)
                    continue
                self._payloads[id(work)] = payload
            live.append(work)
        return live

    def _reject(self, work: Work[H], reason: DeadReason, detail: str) -> None:
        self._result.rejected.append(Rejected(work, reason, detail))

    def _duplicate(self, work: Work[H], why: str) -> None:
        self._result.duplicates.append(work)
        with message_context(work):
            log.info("duplicate_ignored", kind=work.envelope.kind.value, why=why)
