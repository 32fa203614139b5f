"""The worker process: consume, batch, run, commit, publish, ack; relay the outbox; stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import structlog

from stepfleet.broker import Broker, BrokerUnavailable, Delivery, Outgoing, PublishRefused
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.messages import from_outbox, wake_message
from stepfleet.egress import EgressGateway, SealError, open_secrets
from stepfleet.observe import NO_OBSERVER, Observer
from stepfleet.observe.instruments import Instruments, metrics, otlp_traces
from stepfleet.sandbox import (
    CompiledModuleCache,
    CompileFailed,
    GuestProcessPool,
    Sandbox,
    WasmSandbox,
)
from stepfleet.store import PgStore, StoreUnavailable
from stepfleet.workers import faults
from stepfleet.workers import health as health_file
from stepfleet.workers.archive import DeadLetterArchiver
from stepfleet.workers.batch import BatchProcessor
from stepfleet.workers.dead_letter_records import ArchivePolicy
from stepfleet.workers.event_loop import URGENT, run_urgent, urgent_context
from stepfleet.workers.faults import CrashPoints
from stepfleet.workers.health import Health
from stepfleet.workers.inbox import FairInbox
from stepfleet.workers.placement import Placement
from stepfleet.workers.settings import Settings
from stepfleet.workers.side_lanes import SideLanes
from stepfleet.workers.statistics import PlannerStatistics
from stepfleet.workers.sweep import StallSweep
from stepfleet.workers.tenants import ProducerCheck

log = structlog.get_logger("stepfleet.worker")

_MAX_BACKOFF_SECONDS = 30.0
_TRIES_ALONE = 3
"""Tries of a delivery that failed alone before it is ended (a transient cause gets over it)."""
_TIMERS_PER_CLAIM = 500
_TIMER_WINDOW_SECONDS = 0.05
"""The timer loop's shortest wait: timers due this close together are claimed at once."""
_TENANTS_REFRESH_SECONDS = 10.0
_HEALTH_EVERY_SECONDS = 2.0
_LIGHT_BATCH = 16

# wasmtime-py is not thread-safe: it even keeps the exception a host import raised in a
# module-level global until the guest call returns. So every guest run of a process, whatever
# Worker it belongs to, goes through this one thread.
_WASM_THREAD = ThreadPoolExecutor(1, thread_name_prefix="wasm")


class Worker:
    """One worker process's engine room; `run()` until `stop()` is called."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: PgStore | None = None,
        broker: Broker | None = None,
        sandbox: Sandbox | None = None,
        name: str = "worker",
        traces: Observer | None = None,
    ) -> None:
        """`traces` replaces the traces the OpenTelemetry variables configure (tests)."""
        self.settings = settings
        self.name = name
        self.topology = settings.topology()
        self._user = settings.broker_user
        self._owns_store = store is None
        self._owns_broker = broker is None
        self.store = store or PgStore(
            settings.database_url,
            pool_size=settings.concurrency + 2,
            retention_seconds=settings.retention_seconds,
            pre_ping=False,
            guarded_pool_size=settings.concurrency + 1,  # its pipelines and the light one
        )
        self.broker = broker or Broker(settings.amqp_url, self.topology)
        self.tenants = TenantDirectory(settings.engine_limits())
        producers = (
            ProducerCheck(
                self.topology,
                self.tenants,
                settings.trusted_users,
                fleet_user=self._user,
                rows=self.store.tenants,
            )
            if settings.verify_producers
            else None
        )
        self.egress = EgressGateway(
            call_timeout_s=settings.egress_timeout_seconds,
            max_response_bytes=settings.value_bytes,
        )
        self._inbox = FairInbox(self._weight)
        self.metrics = (
            metrics(settings.metric_tenants) if settings.metrics_port is not None else None
        )
        self.metrics_port: int | None = None
        """The port /metrics is served on, once the worker runs (None: no metrics)."""
        traces = traces or otlp_traces()
        self.observer: Observer = (
            Instruments(self.metrics, traces) if self.metrics or traces else NO_OBSERVER
        )
        sandbox = sandbox or WasmSandbox(
            settings.sandbox_limits(),
            module_cache=CompiledModuleCache.open(
                settings.module_cache_dir,
                settings.module_cache_bytes,
                settings.module_cache_key,
            ),
        )
        self._guest_processes = (
            GuestProcessPool(
                sandbox,
                settings.guest_processes,
                log_level=settings.log_level,
                log_format=settings.log_format,
            )
            if settings.guest_processes and isinstance(sandbox, WasmSandbox)
            else None
        )
        self._processor = BatchProcessor(
            store=self.store,
            sandbox=sandbox,
            wasm_thread=_WASM_THREAD,
            guest_processes=self._guest_processes,
            topology=self.topology,
            publish=self._publish,
            max_message_bytes=settings.max_message_bytes,
            value_bytes=settings.value_bytes,
            limits=settings.engine_limits(),
            on_wake_due=self._wake_due_at,
            directory=self.tenants,
            producers=producers,
            crash_points=CrashPoints(faults.parse(settings.crash_points)),
            caller=self.egress,
            max_inflight=settings.max_inflight,
            tenant_inflight=settings.tenant_inflight,
            resume=self._inbox.put_nowait,
            local_steps=settings.local_steps,
            chain_steps=settings.chain_steps,
            early_event_seconds=settings.early_event_seconds,
            early_event_tenant_bytes=settings.early_event_tenant_bytes,
            observer=self.observer,
        )
        self._placement = Placement(
            self.topology.side_lanes, self.broker.place_aside, self.broker.place_in_lanes
        )
        self._side_lanes = SideLanes(
            self.topology,
            self._inbox,
            self._publish,
            backlog=settings.tenant_backlog,
            fleet_user=self._user,
            placement=self._placement,
        )
        self.health = Health(pid=os.getpid(), name=name)
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.steps_done = 0
        self.wakes_sent = 0
        self.archiver = DeadLetterArchiver(
            self.store, ArchivePolicy.of(settings), observer=self.observer
        )
        self.sweep = StallSweep(
            self.store,
            self.topology,
            self._publish,
            stall_after_seconds=settings.stall_after_seconds,
            every_seconds=settings.stall_sweep_seconds,
        )
        self.statistics = PlannerStatistics(self.store)
        self._timer_nudge = asyncio.Event()
        self._timer_deadline = 0.0

    def _weight(self, tenant: str) -> int:
        return self.tenants.limits(tenant).weight or 1

    async def _publish(self, messages: Sequence[Outgoing]) -> None:
        await self.broker.publish_many(messages)

    def _lane_handler(self, lane: str) -> Callable[[Delivery], Awaitable[None]]:
        async def on_delivery(delivery: Delivery) -> None:
            if not self._side_lanes.take(delivery, lane):
                self._inbox.put_nowait(delivery)

        return on_delivery

    async def _on_side_delivery(self, delivery: Delivery) -> None:
        self._inbox.put_nowait(self._side_lanes.restore(delivery))

    def stop(self) -> None:
        """Ask the worker to stop consuming, finish what it holds, and return from run()."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve until stop(): the pipelines, the outbox relay, then a graceful drain."""
        self._serve_metrics()
        if self._owns_broker:
            # The connection's readers and the consumers' tasks run as urgent on the worker's
            # loop (workers/event_loop.py): a delivery is read and in the inbox at once.
            await run_urgent(self.broker.connect(name=f"stepfleet-{self.name}"))
        started: list[asyncio.Task[None]] = []
        try:
            await self._load_tenants()
            await self.broker.declare()
            # One consumer per lane, each with its share of the prefetch: a flooded lane holds
            # at most its share, so other tenants' messages reach the inbox right away.
            per_lane = self.settings.lane_prefetch(self.topology.lanes)
            cancels = [
                await run_urgent(
                    self.broker.consume(queue, self._lane_handler(queue), prefetch=per_lane)
                )
                for queue in self.topology.work_queues
            ]
            # A side lane holds a flooding tenant's work, all of it once the tenant is placed
            # aside: the same share as a lane, room for its calls in flight included.
            cancels += [
                await run_urgent(
                    self.broker.consume(queue, self._on_side_delivery, prefetch=per_lane)
                )
                for queue in self.topology.side_queues
            ]
            # Moving a flood and placing it aside run urgent, over a channel for the bindings
            # opened now: a binding made 200-340 ms after the flood was seen (a channel to
            # open, a task waiting its turn behind the flood's batches) let hundreds more of
            # its messages into a shared lane.
            moving = asyncio.create_task(
                self._side_lanes.run(), name="side-lanes", context=urgent_context()
            )
            with contextlib.suppress(BrokerUnavailable):  # else opened by the first binding
                await run_urgent(self.broker.open_placement())
            placing = asyncio.create_task(
                self._placement.run(), name="placement", context=urgent_context()
            )
            pipelines = [
                asyncio.create_task(self._pipeline(i), name=f"pipeline-{i}")
                for i in range(self.settings.concurrency)
            ]
            pipelines.append(asyncio.create_task(self._light_pipeline(), name="pipeline-light"))
            relay = asyncio.create_task(self._relay(), name="outbox-relay")
            cancels.append(
                await self.broker.consume(
                    self.topology.dead_letter_queue, self.archiver.on_delivery, prefetch=200
                )
            )
            archiving = asyncio.create_task(self.archiver.run(), name="dead-letter-archive")
            timers = asyncio.create_task(self._timers(), name="timers")
            beat = asyncio.create_task(self._heartbeat(), name="health-heartbeat")
            sweeping = asyncio.create_task(self.sweep.run(), name="stall-sweep")
            analyzing = asyncio.create_task(self.statistics.run(), name="planner-statistics")
            started += [
                moving,
                placing,
                *pipelines,
                relay,
                archiving,
                timers,
                beat,
                sweeping,
                analyzing,
            ]
            self.ready.set()
            # Both services just answered: the tenants loaded and the topology declared.
            self.health.store_ok_at = self.health.broker_ok_at = time.time()
            self._report(state="ready")
            log.info(
                "worker_started",
                worker=self.name,
                concurrency=self.settings.concurrency,
                batch_size=self.settings.batch_size,
                prefix=self.settings.prefix,
            )
            await self._stopping.wait()
            log.info("worker_stopping", worker=self.name, held=self._inbox.qsize())
            self._processor.stop_continuing()
            self._report(state="stopping")
            for cancel in cancels:
                await cancel()
            await self._side_lanes.stop()
            # Deliveries already received are finished, not abandoned: the pipelines drain
            # the inbox and exit when it is empty.
            try:
                await asyncio.wait_for(
                    asyncio.gather(*pipelines), timeout=self.settings.shutdown_grace_seconds
                )
            except TimeoutError:
                log.warning("shutdown_grace_exceeded", worker=self.name)
            placing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await placing
            await self._placement.stop()
            for task in (relay, timers, archiving, beat, moving, sweeping, analyzing):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._processor.close()
            await self._flush_confirmed()
        finally:
            # A run cancelled before its tasks ended (by its caller) must not leave them
            # running: they would go on with the closed connections, claiming timers.
            for task in started:
                task.cancel()
            await asyncio.gather(*started, return_exceptions=True)
            self._report(state="stopped")
            if self._guest_processes is not None:
                self._guest_processes.close()
            self.observer.close()
            await self.egress.aclose()
            if self._owns_broker:
                await self.broker.close()
            if self._owns_store:
                await self.store.close()
            log.info("worker_stopped", worker=self.name, steps=self.steps_done)

    def _drained(self) -> bool:
        return (
            self._stopping.is_set() and self._inbox.empty() and not self._processor.calls_in_flight
        )

    def _serve_metrics(self) -> None:
        """Serve /metrics when STEPFLEET_METRICS_PORT is set.

        Raises:
            OSError: the port cannot be bound (the worker does not start).
        """
        if self.metrics is None or self.settings.metrics_port is None:
            return
        processor, inbox = self._processor, self._inbox
        self.metrics.watch(calls_in_flight=lambda: processor.calls.in_flight, inbox=inbox.qsize)
        self.metrics_port = self.metrics.serve(
            self.settings.metrics_port, self.settings.metrics_host
        )
        log.info(
            "metrics_serving",
            worker=self.name,
            host=self.settings.metrics_host,
            port=self.metrics_port,
        )

    async def _pipeline(self, index: int) -> None:
        """Wait for one delivery, then take whatever else is already here, up to a batch."""
        while not self._drained():
            waited = self._inbox.waited
            batch = await self._inbox.take(
                self.settings.batch_size, wait_s=0.2, leave_light=_LIGHT_BATCH
            )
            if batch:
                self.observer.phase("inbox", (self._inbox.waited - waited) / len(batch))
                await self._process_with_retry(batch)

    async def _light_pipeline(self) -> None:
        """Batches of light tenants' deliveries only (see workers/inbox.py), so that a tenant
        asking less than its share never waits for a heavy tenant's large batches. Its
        callbacks run before the heavy batches' on the worker's loop (workers/event_loop.py)."""
        URGENT.set(True)
        gate = self._processor.cycle.gate
        while not self._drained():
            waited = self._inbox.waited
            batch = await self._inbox.take_light(_LIGHT_BATCH, wait_s=0.2)
            if batch:
                self.observer.phase("inbox", (self._inbox.waited - waited) / len(batch))
                with gate.light(), self._inbox.serving_light():
                    await self._process_with_retry(batch)

    async def _process_with_retry(self, batch: list[Delivery]) -> None:
        backoff = 0.1
        failures = 0
        while True:
            try:
                result = await self._processor.process(batch)
            except StoreUnavailable as exc:
                # Nothing was committed or acked: hold the deliveries and try again.
                log.warning("store_unavailable", error=str(exc), retry_in=backoff)
            except CompileFailed as exc:
                # The compiler could not run (not the module's fault: starved, killed from
                # outside); nothing was committed: hold the deliveries and try again.
                log.warning("compile_failed", error=str(exc), retry_in=backoff)
            except BrokerUnavailable as exc:
                # Committed next messages wait in the outbox for the relay. Hand the
                # deliveries back in case their channel survived; if it did not, RabbitMQ
                # redelivers them anyway, and the journal makes the redelivery harmless.
                log.warning("publish_failed", error=str(exc))
                await self._release(batch)
                return
            except PublishRefused as exc:
                log.warning("publish_refused", error=str(exc))
                await self._release(batch)
                return
            except Exception as exc:
                # Whatever one delivery did (a value the database refuses, a host bug it
                # triggers) must not fail the others: each runs alone, and one that still
                # fails alone is ended with its cause.
                failures += 1
                if len(batch) > 1:
                    log.exception("batch_failed", size=len(batch), then="each delivery alone")
                    for delivery in batch:
                        await self._process_with_retry([delivery])
                    return
                if failures >= _TRIES_ALONE:
                    await self._give_up(batch[0], exc)
                    return
                log.warning("delivery_failed", error=str(exc)[:500], retry_in=backoff)
            else:
                self.steps_done += result.steps
                for tenant, steps in result.chained.items():
                    self._inbox.charge(tenant, steps)
                for delivery in result.deferred:
                    self._inbox.put_nowait(delivery)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)

    async def _give_up(self, delivery: Delivery, error: Exception) -> None:
        try:
            await self._processor.give_up(delivery, error)
        except (StoreUnavailable, BrokerUnavailable, PublishRefused) as exc:
            # Not ended: the queue's delivery limit is the last safety net.
            log.warning("give_up_failed", error=str(exc))
            await self._release([delivery])

    async def _release(self, batch: list[Delivery]) -> None:
        for delivery in batch:
            if self._processor.holds(delivery):  # its call's answer brings it back
                continue
            try:
                await delivery.release()
            except BrokerUnavailable:
                # Its channel is gone and the broker requeues what it held; the next delivery
                # may have come on a channel opened since, which would otherwise keep it (and
                # its lane's prefetch) for good.
                continue

    async def _flush_confirmed(self) -> None:
        ids, self._processor.confirmed_outbox = self._processor.confirmed_outbox, []
        if not ids:
            return
        try:
            async with self.store.transaction() as tx:
                await tx.delete_outbox(ids)
        except StoreUnavailable:
            log.warning("outbox_cleanup_deferred", count=len(ids))

    def _report(self, *, state: str | None = None) -> None:
        """Rewrite the health file (when one is configured)."""
        if state is not None:
            self.health.state = state
        self.health.steps = self.steps_done
        self.health.cpu_seconds = time.process_time()
        self.health.stalls_swept = self.sweep.swept
        self.health.instances_stalled = self.archiver.stalled
        phases = self._processor.cycle.phases
        phases.inbox_wait = self._inbox.waited
        self.health.phases = phases.as_dict()
        if self.settings.health_file is not None:
            health_file.write(self.settings.health_file, self.health)

    async def _load_tenants(self) -> None:
        """Reload producer users, limits, egress allow lists and (opened) secrets."""
        await self.tenants.refresh(self.store.tenants)
        secrets: list[tuple[str, str, str, str]] = []
        stored = await self.store.tenants.secrets()
        key = self.settings.secret_key
        if stored and key is None:
            log.warning("secrets_unavailable", why="STEPFLEET_SECRET_KEY is not set")
        elif stored and key is not None:
            try:
                secrets, problems = open_secrets(key.get_secret_value(), stored)
            except SealError as exc:
                problems = [f"STEPFLEET_SECRET_KEY is not usable: {exc}"]
            for problem in problems:
                log.warning("secret_unavailable", problem=problem)
        self.egress.configure(await self.store.tenants.allowed_hosts(), secrets)

    def _wake_due_at(self, when: datetime) -> None:
        """A batch parked an instance until `when`: check timers then if that is sooner."""
        loop = asyncio.get_running_loop()
        at = loop.time() + max((when - datetime.now(UTC)).total_seconds(), 0.0) + 0.005
        if at < self._timer_deadline:
            self._timer_deadline = at
            self._timer_nudge.set()

    async def _timers(self) -> None:
        """Publish wakes for due timers (kept in PostgreSQL) and delete expired instances."""
        loop = asyncio.get_running_loop()
        next_retention = loop.time() + self.settings.retention_check_seconds
        next_tenants = loop.time() + _TENANTS_REFRESH_SECONDS
        next_backlog = loop.time()
        next_poll = loop.time()  # timers that came due while no worker ran go out at once
        while True:
            self._timer_deadline = next_poll
            while (remaining := self._timer_deadline - loop.time()) > 0:
                self._timer_nudge.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._timer_nudge.wait(), timeout=remaining)
            next_poll = loop.time() + self.settings.timer_poll_seconds
            try:
                next_poll = loop.time() + await self._fire_due_timers()
                self.health.store_ok_at = time.time()
                if self.broker.connected:
                    self.health.broker_ok_at = time.time()
                if self.observer.counting and loop.time() >= next_backlog:
                    next_backlog = loop.time() + _HEALTH_EVERY_SECONDS
                    due, waiting = await self.store.backlog()
                    self.observer.backlog(timers_due=due, outbox_waiting=waiting)
                if loop.time() >= next_tenants:
                    next_tenants = loop.time() + _TENANTS_REFRESH_SECONDS
                    await self._load_tenants()
                if loop.time() >= next_retention:
                    next_retention = loop.time() + self.settings.retention_check_seconds
                    deleted = await self.store.delete_expired(limit=1000)
                    if deleted:
                        log.info("instances_expired", count=deleted)
            except (StoreUnavailable, BrokerUnavailable, PublishRefused) as exc:
                log.warning("timers_failed", error=str(exc))
            except Exception:
                # A background loop must outlive any one failure; the next poll tries again.
                log.exception("timers_failed")

    async def _heartbeat(self) -> None:
        """Rewrite the health file every 2 s while the event loop runs, draining included:
        liveness reads its age, readiness also when PostgreSQL and RabbitMQ last answered."""
        while True:
            await asyncio.sleep(_HEALTH_EVERY_SECONDS)
            self._report()

    async def _fire_due_timers(self) -> float:
        """Publish a wake for every due timer; return the seconds until the next timer is due
        (at least `_TIMER_WINDOW_SECONDS`, at most the poll period): a timer due between two
        polls is claimed on time, not up to a poll period late."""
        while True:
            due = await self.store.due_timers(
                limit=_TIMERS_PER_CLAIM, resend_after_seconds=self.settings.wake_resend_seconds
            )
            if due:
                if self.observer.counting:
                    now = datetime.now(UTC)
                    self.observer.timers_fired([(now - t.wake_at).total_seconds() for t in due])
                await self.broker.publish_many([wake_message(self.topology, t) for t in due])
                self.wakes_sent += len(due)
                log.debug("wakes_sent", count=len(due))
            if len(due) < _TIMERS_PER_CLAIM:
                break
        poll = self.settings.timer_poll_seconds
        if (next_at := await self.store.next_timer()) is None:
            return poll
        until = (next_at - datetime.now(UTC)).total_seconds()
        return min(max(until, _TIMER_WINDOW_SECONDS), poll)

    async def _relay(self) -> None:
        """Publish outbox rows a crashed or cut-off worker left behind; tidy confirmed ones."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                await self._flush_confirmed()
                if tick % 5:
                    continue
                if expired := await self.store.expire_early_events(limit=500):
                    log.info("early_events_expired", count=expired)
                async with self.store.claim_outbox(
                    older_than_seconds=self.settings.outbox_relay_after_seconds, limit=500
                ) as claimed:
                    if claimed:
                        await self.broker.publish_many(
                            [
                                from_outbox(self.topology, message, user_id=self._user)
                                for _, message in claimed
                            ]
                        )
                        log.info("outbox_relayed", count=len(claimed))
            except (StoreUnavailable, BrokerUnavailable, PublishRefused) as exc:
                log.warning("outbox_relay_failed", error=str(exc))
            except Exception:
                log.exception("outbox_relay_failed")
