"""The per-step path: a batch of deliveries, one transaction, one confirm wait.

For each batch: validate every delivery, lock the instances in key order, run each admitted
guest for exactly one new step, write journal rows, instance states and outbox rows in one
transaction, then publish (with confirms) and ack. A crash anywhere leads to redelivery, and
the journal position check turns the redelivery into a no-op.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import structlog

from stepfleet.broker import BrokerUnavailable, Delivery, Outgoing, Topology
from stepfleet.broker.topology import routing_key
from stepfleet.cycle.messages import dead_letter, step_message
from stepfleet.engine import (
    Admit,
    Decision,
    Duplicate,
    EngineLimits,
    InstanceState,
    Keep,
    Reject,
    admit,
    check_size,
    decide,
    resolve_wait,
)
from stepfleet.sandbox import (
    CompileLimitExceeded,
    GuestRun,
    InvalidModule,
    ReplayJournal,
    Sandbox,
    encode_replay_buffer,
)
from stepfleet.schemas import (
    CreateBody,
    DeadReason,
    Envelope,
    EventBody,
    GuestCrashed,
    GuestReport,
    InstanceKey,
    InstanceStatus,
    InvalidMessage,
    JournalEntry,
    MessageKind,
    RunMode,
    Waiting,
    WaitKind,
    parse_envelope,
)
from stepfleet.store import (
    InstanceRecord,
    NewEvent,
    NewInstance,
    PgStore,
    StepTransaction,
    StepWrite,
)
from stepfleet.workers.faults import CrashPoints
from stepfleet.workers.logs import first_line
from stepfleet.workers.replay_cache import CachedReplay, ReplayCache
from stepfleet.workers.tenants import ProducerCheck, TenantDirectory

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
    state: InstanceState | None = None
    """The instance as the run sees it (after a wake or an event ended its wait)."""
    pending: tuple[JournalEntry, ...] = ()
    replay: CachedReplay | None = None


@dataclass(slots=True)
class _Ran:
    work: _Work
    report: GuestReport
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
        value_bytes: int = 1024 * 1024,
        limits: EngineLimits | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_wake_due: Callable[[datetime], None] | None = None,
        directory: TenantDirectory | None = None,
        producers: ProducerCheck | None = None,
        crash_points: CrashPoints | None = None,
    ) -> None:
        self._store = store
        self._sandbox = sandbox
        self._wasm = wasm_thread
        self._topology = topology
        self._publish = publish
        self._max_message_bytes = max_message_bytes
        self._value_bytes = value_bytes
        self._limits = limits or EngineLimits()
        self._directory = directory or TenantDirectory(self._limits)
        self._producers = producers
        self._crash = crash_points or CrashPoints({})
        self._clock = clock
        self._on_wake_due = on_wake_due
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
        works = self._check_routing(await self._verify(works, dead), dead)
        confirmed, self.confirmed_outbox = self.confirmed_outbox, []
        try:
            ran, decisions, outgoing = await self._transact(works, dead, result, confirmed)
        except BaseException:
            self.confirmed_outbox.extend(confirmed)  # still to delete, by the next batch
            raise
        self._remember(ran, decisions)
        result.steps = len(ran)
        result.dead_letters = len(dead)
        self._crash.reach("after-commit")
        await self._publish(outgoing + [letter for _, letter in dead])
        self._crash.reach("after-publish")
        self.confirmed_outbox.extend(result.outbox_ids)
        deferred = {id(d) for d in result.deferred}
        lost: BrokerUnavailable | None = None
        for delivery in deliveries:
            if id(delivery) in deferred:
                continue
            try:
                await delivery.ack()
            except BrokerUnavailable as exc:
                # Its channel is gone and the broker redelivers it; after a reconnect a batch
                # also holds deliveries of the new channels, which must still be acked.
                lost = exc
        if lost is not None:
            raise lost
        return result

    async def give_up(self, delivery: Delivery, error: BaseException) -> None:
        """End one delivery that fails on its own, every time, without touching any other.

        A step or wake errors its instance with the cause (visible in `status`, resumable with
        `stepfleet retry`); anything else is dead-lettered `unprocessable`. Either way the
        delivery is acked.

        Raises:
            StoreUnavailable, BrokerUnavailable, PublishRefused: nothing was done; hand the
                delivery back.
        """
        cause = _describe_failure(error)
        try:
            envelope = parse_envelope(
                delivery.headers, delivery.body, max_body_bytes=self._max_message_bytes
            )
        except InvalidMessage as exc:
            await self._publish([self._dead(delivery, exc.reason, exc.detail)])
            await delivery.ack()
            return
        key = InstanceKey(envelope.tenant, envelope.instance_id)
        if envelope.kind in (MessageKind.STEP, MessageKind.WAKE):
            async with self._store.control() as tx:
                record = await tx.lock(key)
                if record is not None and not record.status.is_final:
                    message = f"stepfleet could not process its {envelope.kind}: {cause}"
                    await tx.update(
                        record, status=InstanceStatus.ERRORED, waiting=None, error=message
                    )
                    log.error(
                        "instance_errored",
                        tenant=key.tenant,
                        instance=key.instance_id,
                        module_digest=record.module,
                        position=record.position,
                        error=message,
                    )
                    await delivery.ack()
                    return
        await self._publish([self._dead(delivery, DeadReason.UNPROCESSABLE, cause)])
        await delivery.ack()

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
            admitted, throttled = await self._apply_quotas(tx, admitted)
            await self._load_replays(tx, admitted)
            admitted, refused = await self._load_modules(tx, admitted)
            ran = refused + await asyncio.get_running_loop().run_in_executor(
                self._wasm, self._run_guests, admitted
            )
            decisions = await self._take_waiting_events(tx, ran, [self._decide(i) for i in ran])
            messages = [
                step_message(
                    self._topology,
                    item.work.key,
                    _module(item.work),
                    d.position,
                    _generation(item.work),
                    item.work.envelope.traceparent,
                )
                for item, d in zip(ran, decisions, strict=True)
                if d.publish_step
            ]
            result.outbox_ids = await tx.write_batch(
                [_write(item.work.key, d) for item, d in zip(ran, decisions, strict=True)]
                + throttled,
                [row for row, _ in messages],
                confirmed_outbox=confirmed,
            )
        self._note_timers(decisions)
        if throttled and self._on_wake_due is not None:
            self._on_wake_due(min(w.waiting.wake_at for w in throttled if w.waiting))
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

    async def _verify(
        self, works: list[_Work], dead: list[tuple[Delivery, Outgoing]]
    ) -> list[_Work]:
        """Drop deliveries whose producer may not act for the tenant they name."""
        if self._producers is None:
            return works
        users = {w.delivery.user_id for w in works if w.delivery.user_id}
        await self._directory.refresh_on_miss(self._store, users)
        allowed: list[_Work] = []
        for work in works:
            refusal = self._producers.check(work.delivery, work.envelope)
            if refusal is None:
                allowed.append(work)
            else:
                dead.append(
                    (work.delivery, self._dead(work.delivery, refusal.reason, refusal.detail))
                )
        return allowed

    def _check_routing(
        self, works: list[_Work], dead: list[tuple[Delivery, Outgoing]]
    ) -> list[_Work]:
        """Drop deliveries whose routing key disagrees with their headers: lanes are chosen
        by the routing key, so it must name the tenant and kind the headers name."""
        agreed: list[_Work] = []
        for work in works:
            expected = routing_key(work.envelope.tenant, work.envelope.kind)
            if work.delivery.routing_key == expected:
                agreed.append(work)
            else:
                detail = f"routing key {work.delivery.routing_key[:300]!r} is not {expected!r}"
                dead.append(
                    (work.delivery, self._dead(work.delivery, DeadReason.BAD_HEADER, detail))
                )
        return agreed

    async def _admit(
        self,
        tx: StepTransaction,
        works: list[_Work],
        dead: list[tuple[Delivery, Outgoing]],
        result: BatchResult,
    ) -> list[_Work]:
        def reject(work: _Work, reason: DeadReason, detail: str) -> None:
            dead.append((work.delivery, self._dead(work.delivery, reason, detail)))

        creates = [w for w in works if isinstance(w.envelope.body, CreateBody)]
        owned = await tx.owned_modules({(w.key.tenant, _module(w)) for w in creates})
        live: list[_Work] = []
        new: list[NewInstance] = []
        for work in works:
            body = work.envelope.body
            if isinstance(body, CreateBody):
                if (work.key.tenant, _module(work)) not in owned:
                    detail = f"module {_module(work)} was never pushed for tenant {work.key.tenant}"
                    reject(work, DeadReason.UNKNOWN_MODULE, detail)
                    continue
                params = json.dumps(body.params, separators=(",", ":"))
                if (over := check_size("params", params, self._value_bytes)) is not None:
                    reject(work, over.reason, over.detail)
                    continue
                new.append(NewInstance(work.key, _module(work), params, body.retention_seconds))
                work.replay = CachedReplay(0, params, ReplayJournal())
            elif isinstance(body, EventBody):
                payload = json.dumps(body.payload, separators=(",", ":"))
                if (over := check_size("event payload", payload, self._value_bytes)) is not None:
                    reject(work, over.reason, over.detail)
                    continue
            live.append(work)
        created = await tx.create_instances(new)
        records = await tx.lock_instances(w.key for w in live)
        now = self._clock()
        admitted: list[_Work] = []
        events: list[NewEvent] = []
        finished_events: list[tuple[_Work, Reject, str]] = []
        for work in live:
            record = records.get(work.key)
            state = None if record is None else _state(record)
            verdict = admit(work.envelope, state, created_now=work.key in created, now=now)
            body = work.envelope.body
            if isinstance(body, EventBody) and isinstance(verdict, Admit | Keep):
                assert state is not None
                consumed = state.position if isinstance(verdict, Admit) else None
                payload = json.dumps(body.payload, separators=(",", ":"))
                events.append(NewEvent(work.key, body.event_id, body.type, payload, consumed))
            if isinstance(verdict, Admit):
                assert state is not None
                work.record = record
                work.state = replace(state, waiting=None) if verdict.woken else state
                work.pending = () if verdict.resolution is None else (verdict.resolution,)
                admitted.append(work)
            elif isinstance(verdict, Duplicate):
                result.duplicates += 1
                self._log_duplicate(work, verdict.why)
            elif isinstance(verdict, Reject):
                if isinstance(body, EventBody) and verdict.reason is DeadReason.INSTANCE_FINISHED:
                    finished_events.append((work, verdict, body.event_id))  # or a repeat
                else:
                    reject(work, verdict.reason, verdict.detail)
            else:
                log.info(
                    "event_stored",
                    tenant=work.key.tenant,
                    instance=work.key.instance_id,
                    event_type=body.type if isinstance(body, EventBody) else None,
                )
        if finished_events:
            known = await tx.known_events([(w.key, event) for w, _, event in finished_events])
            for work, verdict, _ in finished_events:
                if work.key in known:
                    result.duplicates += 1
                    self._log_duplicate(work, "event already delivered")
                else:
                    reject(work, verdict.reason, verdict.detail)
        if events:
            fresh = await tx.insert_events(events)
            repeats = {e.key for e in events if e.key not in fresh}
            for work in [w for w in admitted if w.key in repeats]:
                admitted.remove(work)
                result.duplicates += 1
                self._log_duplicate(work, "event already received")
        return admitted

    def _log_duplicate(self, work: _Work, why: str) -> None:
        log.info(
            "duplicate_ignored",
            tenant=work.key.tenant,
            instance=work.key.instance_id,
            kind=work.envelope.kind.value,
            why=why,
        )

    async def _apply_quotas(
        self, tx: StepTransaction, admitted: list[_Work]
    ) -> tuple[list[_Work], list[StepWrite]]:
        """Hold back deliveries over their tenant's running-steps or rate limit.

        A held-back instance is parked (its timer fires shortly) instead of run, so the flood
        leaves the queue at once and other tenants' messages behind it are reached quickly.
        Deliveries that carry an event or a timed-out wait always run.
        """
        needs: dict[str, list[_Work]] = {}
        for work in admitted:
            own = self._directory.limits(work.key.tenant)
            if (own.running_steps or own.steps_per_second) and not work.pending:
                needs.setdefault(work.key.tenant, []).append(work)
        if not needs:
            return admitted, []
        held: list[StepWrite] = []
        held_ids: set[int] = set()
        now = self._clock()
        for tenant, works in needs.items():
            own = self._directory.limits(tenant)
            held_before = len(held)
            granted = len(works)
            if own.running_steps:
                granted = await tx.grant_slots(tenant, own.running_steps, granted)
            for work in works[granted:]:  # no free slot: look again shortly
                held_ids.add(id(work))
                held.append(_held(work, now + _SLOT_RETRY + _jitter()))
            rate = own.steps_per_second
            # Steps woken from a rate hold took their token when they were held.
            unpaid = [w for w in works[:granted] if not _prepaid(w)] if rate else []
            if rate and unpaid:
                before = await tx.take_tokens(tenant, rate, len(unpaid))
                now_paid = max(0, min(len(unpaid), int(before)))
                for rank, work in enumerate(unpaid[now_paid:], start=1):
                    # Its token comes due (rank - what was left) / rate seconds from now.
                    wait = timedelta(seconds=(rank - (before - now_paid)) / rate)
                    held_ids.add(id(work))
                    held.append(_held(work, now + wait, prepaid=True))
            if len(held) > held_before:
                log.info("tenant_throttled", tenant=tenant, held=len(held) - held_before)
        return [w for w in admitted if id(w) not in held_ids], held

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

    async def _load_modules(
        self, tx: StepTransaction, admitted: list[_Work]
    ) -> tuple[list[_Work], list[_Ran]]:
        """Load the modules the batch needs; return the works to run and the refused ones.

        Compiling (or reading the disk cache) runs on the compiler's threads, in a child process
        under the compile limits, so other batches' guests run meanwhile; the wasm thread only
        deserializes. A refused module's works come back as crashed runs that name the reason,
        so their instances end with it and the rest of the batch goes on.
        """
        missing = {_module(w) for w in admitted if not self._sandbox.is_loaded(_module(w))}
        if not missing:
            return admitted, []
        stored = await tx.module_bytes(missing)
        tenants: dict[str, set[str]] = {}
        for work in admitted:
            tenants.setdefault(_module(work), set()).add(work.key.tenant)
        outcomes = await asyncio.gather(
            *(self._load_module(d, w, sorted(tenants[d])) for d, w in stored.items())
        )
        refused = {d: crash for d, crash in zip(stored, outcomes, strict=True) if crash}
        if not refused:
            return admitted, []
        now = self._clock()
        crashed = [
            _Ran(w, GuestReport(refused[_module(w)], (), []), now, now)
            for w in admitted
            if _module(w) in refused
        ]
        return [w for w in admitted if _module(w) not in refused], crashed

    async def _load_module(
        self, digest: str, wasm: bytes, tenants: list[str]
    ) -> GuestCrashed | None:
        """Load one module; None when loaded, else the crash its refusal means for its runs."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            artifact = await asyncio.wrap_future(self._sandbox.compiler.submit(digest, wasm))
            await loop.run_in_executor(self._wasm, self._sandbox.load, digest, wasm, artifact)
        except InvalidModule as exc:
            limit = exc.limit if isinstance(exc, CompileLimitExceeded) else None
            for tenant in tenants:
                log.warning(
                    "module_refused",
                    tenant=tenant,
                    module_digest=digest,
                    limit=limit,
                    error=str(exc),
                )
            return GuestCrashed(f"module {digest} refused: {exc}", limit)
        ms = round((time.perf_counter() - started) * 1000, 2)
        for tenant in tenants:
            log.info("module_loaded", tenant=tenant, module_digest=digest, ms=ms)
        return None

    def _run_guests(self, admitted: list[_Work]) -> list[_Ran]:
        """Run every admitted guest; called on the wasm thread."""
        ran: list[_Ran] = []
        for work in admitted:
            assert work.replay is not None
            assert work.state is not None
            journal = work.replay.journal
            buffer = encode_replay_buffer(
                work.key.instance_id,
                work.replay.params,
                journal,
                pending=work.pending,
                mode=work.state.mode,
                attempt=work.state.attempt,
            )
            own = self._directory.limits(work.key.tenant)
            job = GuestRun(
                _module(work),
                buffer,
                len(journal) + len(work.pending),
                work.state.attempt,
                fuel_per_run=own.fuel_per_run,
                memory_bytes=own.memory_bytes,
                tenant=work.key.tenant,
                host_calls_per_step=own.host_calls_per_step,
            )
            started_at = self._clock()
            report = self._sandbox.run(job)
            ran.append(_Ran(work, report, started_at, self._clock()))
        return ran

    def _decide(self, item: _Ran) -> Decision:
        work = item.work
        assert work.replay is not None
        assert work.state is not None
        decision = decide(
            work.state,
            work.replay.journal.entries,
            item.report,
            started_at=item.started_at,
            finished_at=item.finished_at,
            limits=self._directory.engine_limits(work.key.tenant),
            pending=work.pending,
        )
        self._log_run(item, decision)
        return decision

    async def _take_waiting_events(
        self, tx: StepTransaction, ran: list[_Ran], decisions: list[Decision]
    ) -> list[Decision]:
        """A run that has just begun a wait takes an event that arrived before it."""
        waits = [
            (item.work.key, d.waiting.event_type, d.position)
            for item, d in zip(ran, decisions, strict=True)
            if d.waiting is not None
            and d.waiting.kind is WaitKind.EVENT
            and d.waiting.event_type is not None
        ]
        if not waits:
            return decisions
        taken = await tx.take_events(waits)
        for key in taken:
            log.info("stored_event_delivered", tenant=key.tenant, instance=key.instance_id)
        return [
            resolve_wait(d, *taken[item.work.key], self._limits)
            if item.work.key in taken and d.waiting is not None
            else d
            for item, d in zip(ran, decisions, strict=True)
        ]

    def _note_timers(self, decisions: list[Decision]) -> None:
        """Tell the timer loop about the earliest wake this batch scheduled."""
        if self._on_wake_due is None:
            return
        due = [d.waiting.wake_at for d in decisions if d.waiting is not None]
        if due:
            self._on_wake_due(min(due))

    def _log_run(self, item: _Ran, decision: Decision) -> None:
        work = item.work
        assert work.state is not None
        entry = decision.step_entry
        failed = decision.failed_attempt
        bound = log.bind(
            tenant=work.key.tenant,
            instance=work.key.instance_id,
            module_digest=_module(work),
            step=failed.name if failed else entry.name if entry else None,
            attempt=failed.attempt if failed else entry.attempt if entry else None,
            position=work.state.position,
        )
        for level, line in item.report.logs:
            getattr(bound, _GUEST_LEVELS[level])("guest_log", message=line)
        ms = round((item.finished_at - item.started_at) / timedelta(milliseconds=1), 3)
        status = decision.status.value
        if decision.error is not None and decision.status.is_final:
            bound.warning("instance_errored", status=status, error=decision.error, ms=ms)
        elif failed is not None:
            retry_at = decision.waiting.wake_at.isoformat() if decision.waiting else "now"
            bound.info("step_attempt_failed", error=failed.error, retry_at=retry_at, ms=ms)
        elif decision.waiting is not None:
            bound.info(
                "instance_parked",
                status=status,
                waits_for=decision.waiting.kind.value,
                name=decision.waiting.name,
                wake_at=decision.waiting.wake_at.isoformat(),
                ms=ms,
            )
        elif entry is not None:
            bound.info("step_recorded", status=status, kind=entry.kind.name.lower(), ms=ms)
        elif decision.mode is not work.state.mode:
            bound.warning("compensations_started", error=decision.error, ms=ms)
        else:
            bound.info("instance_finished", status=status, ms=ms)

    def _remember(self, ran: list[_Ran], decisions: list[Decision]) -> None:
        """After commit: keep the journals of instances that go on, forget finished ones."""
        for item, decision in zip(ran, decisions, strict=True):
            work = item.work
            if decision.status.is_final or work.replay is None:
                self._replays.drop(work.key)
                continue
            journal = work.replay.journal
            for entry in decision.entries:
                if entry.seq == len(journal):
                    journal.append(entry)
            self._replays.put(work.key, work.replay)

    def _dead(self, delivery: Delivery, reason: DeadReason, detail: str) -> Outgoing:
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


_SLOT_RETRY = timedelta(milliseconds=100)
_RATE_HOLD = "rate"
"""The name of a throttle wait whose token is already taken."""


def _jitter() -> timedelta:
    return timedelta(milliseconds=random.uniform(0, 100))


def _prepaid(work: _Work) -> bool:
    waiting = work.record.waiting if work.record is not None else None
    return waiting is not None and waiting.kind is WaitKind.THROTTLE and waiting.name == _RATE_HOLD


def _held(work: _Work, wake_at: datetime, *, prepaid: bool = False) -> StepWrite:
    """The write that parks a held-back instance until `wake_at`, changing nothing else."""
    state = work.state
    assert state is not None
    return StepWrite(
        key=work.key,
        status=InstanceStatus.QUEUED if state.position == 0 else InstanceStatus.RUNNING,
        position=state.position,
        attempt=state.attempt,
        waiting=Waiting(WaitKind.THROTTLE, _RATE_HOLD if prepaid else "", wake_at),
        mode=state.mode,
        end_status=state.end_status,
        error=state.error if state.mode is RunMode.COMPENSATE else None,
        state_bytes=state.state_bytes,
    )


def _generation(work: _Work) -> int:
    return work.record.generation if work.record is not None else 0


def _state(record: InstanceRecord) -> InstanceState:
    return InstanceState(
        key=record.key,
        module=record.module,
        status=record.status,
        position=record.position,
        generation=record.generation,
        attempt=record.attempt,
        waiting=record.waiting,
        mode=record.mode,
        end_status=record.end_status,
        error=record.error,
        state_bytes=record.state_bytes,
    )


def _write(key: InstanceKey, decision: Decision) -> StepWrite:
    return StepWrite(
        key=key,
        status=decision.status,
        position=decision.position,
        entries=decision.entries,
        attempt=decision.attempt,
        waiting=decision.waiting,
        mode=decision.mode,
        end_status=decision.end_status,
        output=decision.output,
        error=decision.error,
        state_bytes=decision.state_bytes,
        failed_attempt=decision.failed_attempt,
    )


def _describe_failure(error: BaseException) -> str:
    """The exception's type and first line, as text any store and terminal can take."""
    kind = type(error).__name__
    text = f"{kind}: {first_line(error)}" if str(error).strip() else kind
    return text.replace("\x00", "\ufffd")[:500]


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")[:200]
    return None if value is None else str(value)[:200]
