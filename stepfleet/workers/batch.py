"""The per-step path: a batch of deliveries, one transaction, one confirm wait.

For each batch: validate every delivery, lock the instances in key order, run each admitted
guest for exactly one new step, write journal rows, instance states and outbox rows in one
transaction, then publish (with confirms) and ack. A crash anywhere leads to redelivery, and
the journal position check turns the redelivery into a no-op.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from stepfleet.broker import Delivery, Outgoing, Topology
from stepfleet.engine import Admit, Decision, Duplicate, InstanceState, admit, decide
from stepfleet.sandbox import GuestRun, ReplayJournal, Sandbox, encode_replay_buffer
from stepfleet.schemas import (
    CreateBody,
    Envelope,
    GuestOutcome,
    InstanceKey,
    InvalidMessage,
    parse_envelope,
)
from stepfleet.store import (
    InstanceRecord,
    NewInstance,
    PgStore,
    StepTransaction,
    StepWrite,
)
from stepfleet.workers.outgoing import dead_letter, step_message
from stepfleet.workers.replay_cache import CachedReplay, ReplayCache

log = structlog.get_logger("stepfleet.worker")

_GUEST_LEVELS = ("debug", "info", "warning", "error")


def utcnow() -> datetime:
    """The worker's clock."""
    return datetime.now(UTC)


@dataclass(slots=True)
class _Work:
    """A valid delivery for one instance, and what the batch learns about it."""

    delivery: Delivery
    envelope: Envelope
    key: InstanceKey
    record: InstanceRecord | None = None
    replay: CachedReplay | None = None


@dataclass(slots=True)
class _Ran:
    work: _Work
    outcome: GuestOutcome
    logs: list[tuple[int, str]]
    started_at: datetime
    finished_at: datetime


@dataclass(slots=True)
class BatchResult:
    """What a batch did, for the worker's bookkeeping and for tests."""

    steps: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    deferred: list[Delivery] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)


class BatchProcessor:
    """Processes batches of deliveries; one per worker process, shared by its pipelines."""

    def __init__(
        self,
        *,
        store: PgStore,
        sandbox: Sandbox,
        wasm_thread: ThreadPoolExecutor,
        topology: Topology,
        publish: Callable[[Sequence[Outgoing]], Awaitable[None]],
        max_message_bytes: int,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._sandbox = sandbox
        self._wasm = wasm_thread
        self._topology = topology
        self._publish = publish
        self._max_message_bytes = max_message_bytes
        self._clock = clock
        self._replays = ReplayCache()
        self.confirmed_outbox: list[int] = []
        """Outbox ids whose publish was confirmed; deleted by the next transaction."""

    async def process(self, deliveries: Sequence[Delivery]) -> BatchResult:
        """Take a batch to the point where every delivery in it is acked or deferred.

        Raises:
            StoreUnavailable: nothing was committed or acked; the caller retries the batch.
        """
        result = BatchResult()
        works, dead = self._validate(deliveries, result)
        confirmed, self.confirmed_outbox = self.confirmed_outbox, []
        try:
            ran, decisions, outgoing = await self._transact(works, dead, result, confirmed)
        except BaseException:
            self.confirmed_outbox.extend(confirmed)  # still to delete, by the next batch
            raise
        self._remember(ran, decisions)
        result.steps = len(ran)
        result.dead_letters = len(dead)
        await self._publish(outgoing + [letter for _, letter in dead])
        self.confirmed_outbox.extend(result.outbox_ids)
        deferred = {id(d) for d in result.deferred}
        for delivery in deliveries:
            if id(delivery) not in deferred:
                await delivery.ack()
        return result

    async def _transact(
        self,
        works: list[_Work],
        dead: list[tuple[Delivery, Outgoing]],
        result: BatchResult,
        confirmed: list[int],
    ) -> tuple[list[_Ran], list[Decision], list[Outgoing]]:
        """Admit, run and record the batch in one transaction; return what to publish."""
        async with self._store.transaction() as tx:
            admitted = await self._admit(tx, works, dead, result)
            await self._load_replays(tx, admitted)
            await self._load_modules(tx, admitted)
            ran = await asyncio.get_running_loop().run_in_executor(
                self._wasm, self._run_guests, admitted
            )
            decisions = [self._decide(item) for item in ran]
            messages = [
                step_message(
                    self._topology,
                    item.work.key,
                    _module(item.work),
                    d.next_position,
                    item.work.envelope.traceparent,
                )
                for item, d in zip(ran, decisions, strict=True)
                if d.next_position is not None
            ]
            result.outbox_ids = await tx.write_batch(
                [_write(item.work.key, d) for item, d in zip(ran, decisions, strict=True)],
                [row for row, _ in messages],
                confirmed_outbox=confirmed,
            )
        return ran, decisions, [outgoing for _, outgoing in messages]

    # -- stages --------------------------------------------------------------------------

    def _validate(
        self, deliveries: Sequence[Delivery], result: BatchResult
    ) -> tuple[list[_Work], list[tuple[Delivery, Outgoing]]]:
        works: list[_Work] = []
        dead: list[tuple[Delivery, Outgoing]] = []
        seen: set[InstanceKey] = set()
        for delivery in deliveries:
            try:
                envelope = parse_envelope(
                    delivery.headers, delivery.body, max_body_bytes=self._max_message_bytes
                )
            except InvalidMessage as exc:
                dead.append((delivery, self._dead(delivery, exc.reason, exc.detail)))
                continue
            key = InstanceKey(envelope.tenant, envelope.instance_id)
            if key in seen:
                # One message per instance per batch; the next one waits for the next batch.
                result.deferred.append(delivery)
                continue
            seen.add(key)
            works.append(_Work(delivery, envelope, key))
        return works, dead

    async def _admit(
        self,
        tx: StepTransaction,
        works: list[_Work],
        dead: list[tuple[Delivery, Outgoing]],
        result: BatchResult,
    ) -> list[_Work]:
        creates = [w for w in works if isinstance(w.envelope.body, CreateBody)]
        owned = await tx.owned_modules({(w.key.tenant, _module(w)) for w in creates})
        live: list[_Work] = []
        new: list[NewInstance] = []
        for work in works:
            if isinstance(work.envelope.body, CreateBody):
                if (work.key.tenant, _module(work)) not in owned:
                    detail = f"module {_module(work)} was never pushed for tenant {work.key.tenant}"
                    dead.append(
                        (work.delivery, self._dead(work.delivery, "unknown-module", detail))
                    )
                    continue
                params = json.dumps(work.envelope.body.params, separators=(",", ":"))
                new.append(NewInstance(work.key, _module(work), params))
                work.replay = CachedReplay(0, params, ReplayJournal())
            live.append(work)
        created = await tx.create_instances(new)
        records = await tx.lock_instances(w.key for w in live)
        admitted: list[_Work] = []
        for work in live:
            record = records.get(work.key)
            state = (
                None
                if record is None
                else InstanceState(work.key, record.module, record.status, record.position)
            )
            verdict = admit(work.envelope, state, created_now=work.key in created)
            if isinstance(verdict, Admit):
                work.record = record
                admitted.append(work)
            elif isinstance(verdict, Duplicate):
                result.duplicates += 1
                log.info(
                    "duplicate_ignored",
                    tenant=work.key.tenant,
                    instance=work.key.instance_id,
                    kind=work.envelope.kind.value,
                    why=verdict.why,
                )
            else:
                dead.append(
                    (work.delivery, self._dead(work.delivery, verdict.reason, verdict.detail))
                )
        return admitted

    async def _load_replays(self, tx: StepTransaction, admitted: list[_Work]) -> None:
        since: dict[InstanceKey, int] = {}
        cold: list[InstanceKey] = []
        for work in admitted:
            assert work.record is not None
            if work.replay is not None:  # created by this very batch: nothing recorded yet
                continue
            cached = self._replays.usable(work.key, work.record.generation, work.record.position)
            work.replay = cached
            if cached is None:
                cold.append(work.key)
                since[work.key] = 0
            elif len(cached.journal) < work.record.position:
                since[work.key] = len(cached.journal)  # another worker ran the steps between
        if not since:
            return
        params, entries = await tx.replay_data(since, with_params=cold)
        for work in admitted:
            if work.key not in since:
                continue
            assert work.record is not None
            if work.replay is None:
                work.replay = CachedReplay(
                    work.record.generation, params[work.key], ReplayJournal()
                )
                self._replays.put(work.key, work.replay)
            # Fetched rows are committed, so the cached journal may grow in place; another
            # pipeline of this process may have appended some of them already.
            journal = work.replay.journal
            journal.extend(e for e in entries[work.key] if e.seq >= len(journal))
            if len(journal) != work.record.position:
                self._replays.drop(work.key)
                raise RuntimeError(
                    f"journal of {work.key} has {len(journal)} entries, "
                    f"the instance says {work.record.position}"
                )

    async def _load_modules(self, tx: StepTransaction, admitted: list[_Work]) -> None:
        missing = {_module(w) for w in admitted if not self._sandbox.is_loaded(_module(w))}
        if not missing:
            return
        stored = await tx.module_bytes(missing)
        loop = asyncio.get_running_loop()
        for digest, wasm in stored.items():
            started = time.perf_counter()
            await loop.run_in_executor(self._wasm, self._sandbox.load, digest, wasm)
            log.info(
                "module_compiled",
                module_digest=digest,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )

    def _run_guests(self, admitted: list[_Work]) -> list[_Ran]:
        """Run every admitted guest; called on the wasm thread."""
        ran: list[_Ran] = []
        for work in admitted:
            assert work.replay is not None
            buffer = encode_replay_buffer(
                work.key.instance_id, work.replay.params, work.replay.journal
            )
            started_at = self._clock()
            outcome, logs = self._sandbox.run(GuestRun(_module(work), buffer))
            ran.append(_Ran(work, outcome, logs, started_at, self._clock()))
        return ran

    def _decide(self, item: _Ran) -> Decision:
        work = item.work
        assert work.replay is not None
        assert work.record is not None
        position = len(work.replay.journal)
        state = InstanceState(work.key, _module(work), work.record.status, position)
        decision = decide(
            state,
            work.replay.journal.entries,
            item.outcome,
            started_at=item.started_at,
            finished_at=item.finished_at,
        )
        entry = decision.entry
        bound = log.bind(
            tenant=work.key.tenant,
            instance=work.key.instance_id,
            module_digest=_module(work),
            step=entry.name if entry else None,
            attempt=entry.attempt if entry else None,
            position=position,
        )
        for level, line in item.logs:
            getattr(bound, _GUEST_LEVELS[level])("guest_log", message=line)
        ms = round((item.finished_at - item.started_at) / timedelta(milliseconds=1), 3)
        if decision.error is not None:
            bound.warning(
                "instance_errored", status=decision.status.value, error=decision.error, ms=ms
            )
        elif entry is not None:
            bound.info(
                "step_recorded", status=decision.status.value, kind=entry.kind.name.lower(), ms=ms
            )
        else:
            bound.info("instance_finished", status=decision.status.value, ms=ms)
        return decision

    def _remember(self, ran: list[_Ran], decisions: list[Decision]) -> None:
        """After commit: keep the journals of instances that go on, forget finished ones."""
        for item, decision in zip(ran, decisions, strict=True):
            work = item.work
            if decision.status.is_final or work.replay is None:
                self._replays.drop(work.key)
                continue
            journal = work.replay.journal
            if decision.entry is not None and decision.entry.seq == len(journal):
                journal.append(decision.entry)
            self._replays.put(work.key, work.replay)

    def _dead(self, delivery: Delivery, reason: str, detail: str) -> Outgoing:
        log.warning(
            "dead_lettered",
            reason=reason,
            detail=detail,
            tenant=_text(delivery.headers.get("x-tenant")),
            instance=_text(delivery.headers.get("x-instance-id")),
            routing_key=delivery.routing_key,
        )
        return dead_letter(self._topology, delivery, reason, detail)


def _module(work: _Work) -> str:
    if work.record is not None:
        return work.record.module
    assert work.envelope.module is not None
    return work.envelope.module


def _write(key: InstanceKey, decision: Decision) -> StepWrite:
    return StepWrite(
        key=key,
        status=decision.status,
        position=decision.position,
        entry=decision.entry,
        output=decision.output,
        error=decision.error,
    )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")[:200]
    return None if value is None else str(value)[:200]
