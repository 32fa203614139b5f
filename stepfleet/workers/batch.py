"""The fleet's side of the step cycle: deliveries in, messages out, acks last.

For each batch: parse every delivery, check its producer and routing key, hand the valid
ones to the step cycle (cycle/step.py: one transaction), then publish the next steps and the
dead letters with confirms, and only then ack. A crash anywhere leads to redelivery, and the
journal position check turns the redelivery into a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from stepfleet.broker import BrokerUnavailable, Delivery, Outgoing, Topology
from stepfleet.broker.topology import routing_key
from stepfleet.cycle.admission import EarlyHold
from stepfleet.cycle.calls import Caller, CallScheduler
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.messages import dead_letter, outbox_row
from stepfleet.cycle.step import StepCycle, utcnow
from stepfleet.cycle.work import Apart, CycleResult, NextStep, Suspended, Work
from stepfleet.engine import EngineLimits
from stepfleet.observe import NO_OBSERVER, Observer
from stepfleet.sandbox import LongRuns, Sandbox
from stepfleet.schemas import (
    DeadReason,
    InstanceKey,
    InvalidMessage,
    MessageKind,
    parse_envelope,
)
from stepfleet.store.port import StepStore
from stepfleet.workers.faults import CrashPoints
from stepfleet.workers.logs import first_line
from stepfleet.workers.observing import batch_done
from stepfleet.workers.tenants import ProducerCheck

log = structlog.get_logger("stepfleet.worker")


@dataclass(slots=True)
class BatchResult:
    """What a batch did, for the worker's bookkeeping and for tests."""

    steps: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    deferred: list[Delivery] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)
    """The outbox rows of the next steps it published (deleted once confirmed)."""
    chained: dict[str, int] = field(default_factory=dict)
    """Steps run after a delivery's own and written with it (cycle/chain.py), by tenant."""


class BatchProcessor:
    """Processes batches of deliveries; one per worker process, shared by its pipelines."""

    def __init__(
        self,
        *,
        store: StepStore,
        sandbox: Sandbox,
        wasm_thread: Executor | None,
        guest_processes: LongRuns | None = None,
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
        caller: Caller | None = None,
        max_inflight: int = 1000,
        tenant_inflight: int = 250,
        resume: Callable[[Delivery], None] | None = None,
        local_steps: int = 0,
        chain_steps: int = 16,
        early_event_seconds: float = 0.0,
        early_event_tenant_bytes: int | None = None,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        """`caller` makes guests' HTTP calls (the egress gateway); `resume` hands a delivery
        whose step's call was answered (or a next step taken on locally) to the worker's
        inbox; `local_steps`: next steps this process may hold for itself at once instead of
        publishing them (0: publish every one); `chain_steps`: steps of one instance it may
        run before one write (cycle/chain.py; 1: one per write); `observer` gets the batch's
        metrics and spans; `early_event_seconds` and `early_event_tenant_bytes`: how long an
        event that comes before its instance is held, and how much one tenant's held events
        may store (None: no limit)."""
        self._topology = topology
        self._publish = publish
        self._max_message_bytes = max_message_bytes
        self._producers = producers
        self._crash = crash_points or CrashPoints({})
        self.cycle = StepCycle(
            store=store,
            sandbox=sandbox,
            topology=topology,
            guest_thread=wasm_thread,
            # A run set apart comes back through `resume`.
            guest_processes=guest_processes if resume is not None else None,
            value_bytes=value_bytes,
            limits=limits,
            directory=directory,
            clock=clock,
            on_wake_due=on_wake_due,
            early=EarlyHold(
                early_event_seconds,
                lambda d, r, t: outbox_row(dead_letter(topology, d, r, t)),
                early_event_tenant_bytes,
            ),
            chain_steps=chain_steps,
            observer=observer,
        )
        self._observer = observer
        self.confirmed_outbox: list[int] = []
        """Outbox ids whose publish was confirmed; deleted by the next transaction."""
        directory = self.cycle.directory
        self.calls = CallScheduler(
            caller,
            max_in_flight=max_inflight,
            tenant_cap=lambda t: directory.limits(t).calls_in_flight or tenant_inflight,
            observer=observer,
        )
        self._resume = resume
        self._resuming: dict[int, Work[Delivery]] = {}
        """Deliveries whose step waits on a call (or its answer came): by id, their work."""
        self._calling: set[asyncio.Task[None]] = set()
        self._apart: set[asyncio.Task[None]] = set()
        self._local_steps = local_steps if resume is not None else 0
        self._local: set[int] = set()
        """Next steps taken on locally and not written yet: their deliveries' ids."""

    async def process(self, deliveries: Sequence[Delivery]) -> BatchResult:
        """Take a batch to the point where every delivery in it is acked or deferred.

        Raises:
            StoreUnavailable: nothing was committed or acked; the caller retries the batch.
        """
        gate = self.cycle.gate
        await gate.step_aside()
        began = time.monotonic()
        result = BatchResult()
        phases = self.cycle.phases
        phases.batches += 1
        phases.deliveries += len(deliveries)
        with phases.timing("checks"):
            works, dead = self._parse(deliveries, result)
            fresh = [w for w in works if id(w.handle) not in self._resuming]
            checked = {id(w) for w in self._check_routing(await self._verify(fresh, dead), dead)}
            works = [w for w in works if id(w.handle) in self._resuming or id(w) in checked]
        if any(w.envelope.kind is MessageKind.STEP for w in works):
            self._crash.reach("step-before-commit")
        confirmed, self.confirmed_outbox = self.confirmed_outbox, []
        try:
            cycle = await self.cycle.run(works, confirmed_outbox=confirmed)
        except BaseException:
            self.confirmed_outbox.extend(confirmed)  # still to delete, by the next batch
            raise
        dead += [self._dead(r.work.handle, r.reason, r.detail) for r in cycle.rejected]
        self._count(result, cycle, dead)
        waiting = {id(s.work.handle) for s in cycle.suspended + cycle.apart}
        result.deferred += [w.handle for w in cycle.again]  # their instance exists now
        deferred = {id(d) for d in result.deferred}  # a resumed one keeps its answers
        for delivery in deliveries:
            if id(delivery) not in waiting and id(delivery) not in deferred:
                self._resuming.pop(id(delivery), None)
                self._local.discard(id(delivery))
        # A local next step that was not run keeps no outbox row for the relay to send.
        self.confirmed_outbox += [
            w.intent
            for w in cycle.duplicates + [r.work for r in cycle.rejected]
            if w.intent is not None
        ]
        # Nothing of theirs was written, so their calls need not wait for the publish.
        for suspended in cycle.suspended:
            self._call(suspended)
        for apart in cycle.apart:
            self._run_apart(apart)
        self._crash.reach("after-commit")
        published = self._continue_locally(cycle.next_steps)
        if len(published) < len(cycle.next_steps):
            await asyncio.sleep(0)  # an idle pipeline starts them while this one publishes and acks
        await gate.step_aside()
        with phases.timing("publish") as publishing:
            await self._publish([step.message for step in published] + dead)
        self._crash.reach("after-publish")
        result.outbox_ids = [step.outbox_id for step in published]
        self.confirmed_outbox += result.outbox_ids
        with phases.timing("ack") as acking:
            await _ack_all(deliveries, deferred | waiting)
        batch_done(
            self._observer,
            deliveries,
            works,
            cycle,
            deferred,
            local_steps=len(cycle.next_steps) - len(published),
            began=began,
            published=publishing if published or dead else None,
            acked=acking,
        )
        return result

    def stop_continuing(self) -> None:
        """Publish every next step from now on (the worker is stopping)."""
        self._local_steps = 0

    def _continue_locally(self, steps: list[NextStep]) -> list[NextStep]:
        """Hand the next steps this process has room for to its own inbox; return the others,
        to publish.

        A step taken on here skips the publish, its confirm, the delivery and the ack; one
        whose run stopped at an HTTP call before the write (cycle/chain.py) has the call made
        at once, and comes back with the answer. Its
        outbox row stays until the write that runs the step deletes it: should this process
        die first, the outbox relay of any worker publishes it (after
        STEPFLEET_OUTBOX_RELAY_AFTER_SECONDS).
        """
        room = self._local_steps - len(self._local)
        if room <= 0:
            return steps
        for step in steps[:room]:
            delivery = _local_delivery(step.message)
            work: Work[Delivery] = Work(delivery, step.envelope)
            work.intent, work.expected = step.outbox_id, step.state
            self._local.add(id(delivery))
            if step.call is not None:  # its run stopped at a call already: make the call
                work.started_at = step.started_at
                self._call(Suspended(work, step.call))
                continue
            self._resuming[id(delivery)] = work
            assert self._resume is not None
            self._resume(delivery)
        return steps[room:]

    def holds(self, delivery: Delivery) -> bool:
        """Whether the delivery's step waits on a call (or has its answer): it is acked when
        its step is written, and must not be handed back meanwhile."""
        return id(delivery) in self._resuming

    @property
    def calls_in_flight(self) -> int:
        """Deliveries whose step waits on an HTTP call's answer."""
        return len(self._calling)

    async def close(self) -> None:
        """Abandon the calls and guest-process runs in flight: their deliveries are not acked,
        so they come again."""
        tasks = self._calling | self._apart
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run_apart(self, apart: Apart[Delivery]) -> None:
        """Wait off the batch for a long run in a guest process; then hand its delivery back
        (a run that failed or was cancelled is made again by the cycle that takes it)."""
        delivery = apart.work.handle
        self._resuming[id(delivery)] = apart.work

        async def wait() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(apart.report)
            if self._resume is not None:
                self._resume(delivery)

        task = asyncio.create_task(wait(), name="guest-process-run")
        self._apart.add(task)
        task.add_done_callback(self._apart.discard)

    def _call(self, suspended: Suspended[Delivery]) -> None:
        """Make a suspended step's call off the batch; then hand its delivery back."""
        delivery = suspended.work.handle
        self._resuming[id(delivery)] = suspended.work

        async def call() -> None:
            await self.calls.answer(suspended)
            if self._resume is not None:
                self._resume(delivery)

        task = asyncio.create_task(call(), name="egress-call")
        self._calling.add(task)
        task.add_done_callback(self._calling.discard)

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
        self._resuming.pop(id(delivery), None)
        self._local.discard(id(delivery))
        try:
            envelope = parse_envelope(
                delivery.headers, delivery.body, max_body_bytes=self._max_message_bytes
            )
        except InvalidMessage as exc:
            await self._publish([self._dead(delivery, exc.reason, exc.detail)])
            await delivery.ack()
            return
        if envelope.kind in (MessageKind.STEP, MessageKind.WAKE):
            key = InstanceKey(envelope.tenant, envelope.instance_id)
            message = f"stepfleet could not process its {envelope.kind}: {cause}"
            if await self.cycle.error_instance(key, message):
                await delivery.ack()
                return
        await self._publish([self._dead(delivery, DeadReason.UNPROCESSABLE, cause)])
        await delivery.ack()

    # -- before the cycle: what only a broker delivery can tell ---------------------------

    def _parse(
        self, deliveries: Sequence[Delivery], result: BatchResult
    ) -> tuple[list[Work[Delivery]], list[Outgoing]]:
        works: list[Work[Delivery]] = []
        dead: list[Outgoing] = []
        seen: set[InstanceKey] = set()
        for delivery in deliveries:
            resumed = self._resuming.get(id(delivery))
            if resumed is not None:  # its step's call was answered: checked already
                if resumed.key in seen:
                    result.deferred.append(delivery)
                else:
                    seen.add(resumed.key)
                    works.append(resumed)
                continue
            try:
                envelope = parse_envelope(
                    delivery.headers, delivery.body, max_body_bytes=self._max_message_bytes
                )
            except InvalidMessage as exc:
                dead.append(self._dead(delivery, exc.reason, exc.detail))
                continue
            work = Work(delivery, envelope)
            if work.key in seen:
                # One message per instance per batch; the next one waits for the next batch.
                result.deferred.append(delivery)
                continue
            seen.add(work.key)
            works.append(work)
        return works, dead

    async def _verify(
        self, works: list[Work[Delivery]], dead: list[Outgoing]
    ) -> list[Work[Delivery]]:
        """Drop deliveries whose producer may not act for the tenant they name."""
        if self._producers is None:
            return works
        await self._producers.refresh_on_miss({u for w in works if (u := w.handle.user_id)})
        allowed: list[Work[Delivery]] = []
        for work in works:
            refusal = self._producers.check(work.handle, work.envelope)
            if refusal is None:
                allowed.append(work)
            else:
                dead.append(self._dead(work.handle, refusal.reason, refusal.detail))
        return allowed

    def _check_routing(
        self, works: list[Work[Delivery]], dead: list[Outgoing]
    ) -> list[Work[Delivery]]:
        """Drop deliveries whose routing key disagrees with their headers: lanes are chosen
        by the routing key, so it must name the tenant and kind the headers name."""
        agreed: list[Work[Delivery]] = []
        for work in works:
            expected = routing_key(work.envelope.tenant, work.envelope.kind)
            if work.handle.routing_key == expected:
                agreed.append(work)
            else:
                detail = f"routing key {work.handle.routing_key[:300]!r} is not {expected!r}"
                dead.append(self._dead(work.handle, DeadReason.BAD_HEADER, detail))
        return agreed

    # -- after the cycle ------------------------------------------------------------------

    @staticmethod
    def _count(result: BatchResult, cycle: CycleResult[Delivery], dead: list[Outgoing]) -> None:
        result.steps = len(cycle.ran)
        result.duplicates = len(cycle.duplicates)
        runs: set[int] = set()
        for item in cycle.ran:
            if id(item.work.handle) in runs:
                tenant = item.work.key.tenant
                result.chained[tenant] = result.chained.get(tenant, 0) + 1
            runs.add(id(item.work.handle))
        result.dead_letters = len(dead)

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


async def _nothing() -> None:
    return None


def _local_delivery(message: Outgoing) -> Delivery:
    """A next step taken on by the process that wrote it: no broker delivery to ack or
    release (its outbox row is what makes it durable)."""
    return Delivery(
        body=message.body,
        headers=message.headers,
        routing_key=message.routing_key,
        exchange=message.exchange,
        message_id=message.message_id,
        user_id=None,
        redelivered=False,
        delivery_count=0,
        _ack=_nothing,
        _release=_nothing,
    )


async def _ack_all(deliveries: Sequence[Delivery], deferred: set[int]) -> None:
    """Ack every delivery not deferred, even past one whose channel is gone.

    Raises:
        BrokerUnavailable: some channel was lost; its deliveries come back by redelivery.
    """
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


def _describe_failure(error: BaseException) -> str:
    """The exception's type and first line, as text any store and terminal can take."""
    kind = type(error).__name__
    text = f"{kind}: {first_line(error)}" if str(error).strip() else kind
    return text.replace("\x00", "\ufffd")[:500]


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")[:200]
    return None if value is None else str(value)[:200]
