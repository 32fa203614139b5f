"""Operator actions, each one transaction under the instance's row lock.

A pause lands between two steps (the per-step path holds the same lock while it runs one);
every later message for a paused, terminated or restarted instance is recognised by the
engine's admission and acknowledged without effect. Messages an action needs (the next step
after a resume, restart or compensating terminate) go through the outbox, so a crash between
commit and publish loses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from stepfleet.broker import Outgoing, Topology
from stepfleet.control.audit import operator_name
from stepfleet.cycle.messages import step_message
from stepfleet.schemas import InstanceKey, InstanceStatus, RunMode, Waiting, WaitKind
from stepfleet.store import (
    AuditEntry,
    ControlTransaction,
    InstanceDetail,
    InstanceRecord,
    PgStore,
)

if TYPE_CHECKING:  # aio-pika: imported by whoever passes a connected broker
    from stepfleet.broker import Broker

log = structlog.get_logger("stepfleet.control")


class ControlError(Exception):
    """An action that cannot be done, with a message for the operator."""


class Control:
    """Operator actions against the store, publishing what they queue through `broker`."""

    def __init__(
        self,
        store: PgStore,
        broker: Broker | None,
        topology: Topology,
        *,
        actor: str | None = None,
    ) -> None:
        self._store = store
        self._broker = broker
        self._topology = topology
        self.actor = actor or operator_name()

    # -- reads ---------------------------------------------------------------------------

    async def status(self, key: InstanceKey) -> InstanceDetail:
        """Return the instance with its journal and attempts."""
        detail = await self._store.detail(key)
        if detail is None:
            raise ControlError(_unknown(key))
        return detail

    async def list_instances(
        self,
        tenant: str,
        *,
        statuses: Sequence[InstanceStatus] = (),
        module: str | None = None,
        stalled: bool = False,
        limit: int = 100,
    ) -> list[InstanceRecord]:
        """List a tenant's instances, newest first (with `stalled`, only those marked
        stalled)."""
        return await self._store.list_instances(
            tenant, statuses=statuses, module=module, stalled=stalled, limit=limit
        )

    # -- actions -------------------------------------------------------------------------

    async def pause(self, key: InstanceKey) -> InstanceRecord:
        """Stop the instance between steps; its timers keep their due times."""
        async with self._store.control() as tx:
            record = await self._lock(tx, key)
            await tx.audit(AuditEntry(self.actor, "pause", _target(key)))
            _refuse_final(record, "paused")
            if record.status is not InstanceStatus.PAUSED:
                await tx.update(
                    record,
                    status=InstanceStatus.PAUSED,
                    waiting=record.waiting,
                    end_status=record.end_status,
                    error=record.error,
                    keep_stall=True,
                )
        log.info("instance_paused", tenant=key.tenant, instance=key.instance_id)
        return record

    async def resume(self, key: InstanceKey) -> InstanceRecord:
        """Continue a paused instance where it stopped."""
        async with self._store.control() as tx:
            record = await self._lock(tx, key)
            await tx.audit(AuditEntry(self.actor, "resume", _target(key)))
            if record.status is not InstanceStatus.PAUSED:
                raise ControlError(f"instance {key.instance_id} is {record.status}, not paused")
            waiting = record.waiting
            # An event that arrived while paused ends an event wait: run the wait again and
            # the per-step path hands it the stored event.
            if (
                waiting is not None
                and waiting.kind is WaitKind.EVENT
                and waiting.event_type is not None
                and await tx.has_event(key, waiting.event_type)
            ):
                waiting = None
            status = _live_status(waiting)
            await tx.update(
                record,
                status=status,
                waiting=waiting,
                end_status=record.end_status,
                error=record.error,
            )
            ids, messages = await self._queue_step(tx, record, waiting is None)
        await self._publish(ids, messages)
        log.info("instance_resumed", tenant=key.tenant, instance=key.instance_id, status=status)
        return record

    async def terminate(self, key: InstanceKey, *, rollback: bool = False) -> InstanceRecord:
        """Stop the instance for good and cancel its timers; with `rollback`, run the
        compensations of its completed steps first."""
        async with self._store.control() as tx:
            record = await self._lock(tx, key)
            await tx.audit(AuditEntry(self.actor, "terminate", _target(key)))
            _refuse_final(record, "terminated")
            compensate = rollback and (
                record.mode is RunMode.COMPENSATE or await tx.has_rollbacks(key)
            )
            if compensate:
                await tx.update(
                    record,
                    status=InstanceStatus.RUNNING,
                    waiting=None,
                    attempt=1 if record.mode is RunMode.FORWARD else record.attempt,
                    mode=RunMode.COMPENSATE,
                    end_status=InstanceStatus.TERMINATED,
                    error=record.error or "terminated by an operator",
                )
                ids, messages = await self._queue_step(tx, record, True)
            else:
                await tx.update(
                    record,
                    status=InstanceStatus.TERMINATED,
                    waiting=None,
                    error=record.error or "terminated by an operator",
                )
                ids, messages = [], []
        await self._publish(ids, messages)
        log.info(
            "instance_terminated",
            tenant=key.tenant,
            instance=key.instance_id,
            compensating=compensate,
        )
        return record

    async def restart(self, key: InstanceKey, *, from_step: str | None = None) -> InstanceRecord:
        """Run the instance again on its pinned module: from the beginning, or from the first
        step named `from_step`, keeping the journal before it."""
        async with self._store.control() as tx:
            record = await self._lock(tx, key)
            await tx.audit(AuditEntry(self.actor, "restart", _target(key)))
            seq = 0
            if from_step is not None:
                found = await tx.first_step_named(key, from_step)
                if found is None:
                    raise ControlError(
                        f"instance {key.instance_id} has no step named {from_step!r}"
                    )
                seq = found
            await tx.rewind(key, seq)
            restarted, ids, messages = await self._run_again(tx, record, seq, attempt=1)
        await self._publish(ids, messages)
        log.info(
            "instance_restarted",
            tenant=key.tenant,
            instance=key.instance_id,
            from_position=seq,
            generation=restarted.generation,
        )
        return restarted

    async def retry(self, key: InstanceKey) -> InstanceRecord:
        """Run a failed (errored) instance again from the step that failed for good, keeping
        the journal before it; an instance that failed outside a step runs on from where it
        stopped. Meant for after a fix, e.g. a move to corrected code."""
        async with self._store.control() as tx:
            record = await self._lock(tx, key)
            if record.status is not InstanceStatus.ERRORED:
                raise ControlError(f"instance {key.instance_id} is {record.status}, not errored")
            failed = await tx.last_failed_step(key)
            seq = record.position if failed is None else failed
            await tx.audit(
                AuditEntry(self.actor, "retry", _target(key), detail=f"from position {seq}")
            )
            # The attempt count goes on from the failed one, which joins the attempt history.
            attempt = 1 if failed is None else await tx.retire_failed_step(key, seq) + 1
            retried, ids, messages = await self._run_again(tx, record, seq, attempt=attempt)
        await self._publish(ids, messages)
        log.info("instance_retried", tenant=key.tenant, instance=key.instance_id, position=seq)
        return retried

    async def failed_instances(
        self, tenant: str, *, module: str | None = None, error_contains: str | None = None
    ) -> list[InstanceRecord]:
        """A tenant's errored instances, optionally of one module or with an error text."""
        records = await self._store.list_instances(
            tenant, statuses=[InstanceStatus.ERRORED], module=module, limit=1_000_000
        )
        return [r for r in records if not error_contains or error_contains in (r.error or "")]

    async def pause_module(self, tenant: str, module: str) -> list[InstanceKey]:
        """Pause every live instance of one tenant's module digest (e.g. bad code)."""
        paused = []
        live = [
            InstanceStatus.RUNNING,
            InstanceStatus.SLEEPING,
            InstanceStatus.WAITING,
            InstanceStatus.QUEUED,
        ]
        for record in await self._store.list_instances(
            tenant, statuses=live, module=module, limit=1_000_000
        ):
            try:
                await self.pause(record.key)
            except ControlError:
                continue  # finished meanwhile
            paused.append(record.key)
        return paused

    async def resume_module(self, tenant: str, module: str) -> list[InstanceKey]:
        """Resume every paused instance of one tenant's module digest."""
        resumed = []
        for record in await self._store.list_instances(
            tenant, statuses=[InstanceStatus.PAUSED], module=module, limit=1_000_000
        ):
            try:
                await self.resume(record.key)
            except ControlError:
                continue
            resumed.append(record.key)
        return resumed

    async def delete(self, key: InstanceKey) -> None:
        """Delete a finished instance with its journal and events."""
        async with self._store.control() as tx:
            record = await self._lock(tx, key)
            await tx.audit(AuditEntry(self.actor, "delete", _target(key)))
            if not record.status.is_final:
                raise ControlError(
                    f"instance {key.instance_id} is {record.status}: terminate it first"
                )
            await tx.delete(key)
        log.info("instance_deleted", tenant=key.tenant, instance=key.instance_id)

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    async def _lock(tx: ControlTransaction, key: InstanceKey) -> InstanceRecord:
        record = await tx.lock(key)
        if record is None:
            raise ControlError(_unknown(key))
        return record

    async def _run_again(
        self, tx: ControlTransaction, record: InstanceRecord, position: int, *, attempt: int
    ) -> tuple[InstanceRecord, list[int], list[Outgoing]]:
        """Set the instance running from `position` as a new generation (so messages sent
        before are ignored) and queue its next step."""
        again = InstanceRecord(
            key=record.key,
            module=record.module,
            status=InstanceStatus.RUNNING,
            position=position,
            generation=record.generation + 1,
            traceparent=record.traceparent,
        )
        await tx.update(
            again,
            status=InstanceStatus.RUNNING,
            waiting=None,
            attempt=attempt,
            mode=RunMode.FORWARD,
        )
        ids, messages = await self._queue_step(tx, again, True)
        return again, ids, messages

    async def _queue_step(
        self, tx: ControlTransaction, record: InstanceRecord, needed: bool
    ) -> tuple[list[int], list[Outgoing]]:
        if not needed:
            return [], []
        # The instance's own trace context: the step continues its trace.
        row, message = step_message(
            self._topology,
            record.key,
            record.module,
            record.position,
            record.generation,
            record.traceparent,
        )
        return await tx.add_outbox([row]), [message]

    async def _publish(self, ids: list[int], messages: list[Outgoing]) -> None:
        """Publish what the action queued; if that fails, the outbox relay sends it later."""
        if not messages or self._broker is None:
            return
        await self._broker.publish_many(messages)
        await self._store.delete_outbox(ids)


def _target(key: InstanceKey) -> str:
    return f"{key.tenant}/{key.instance_id}"


def _unknown(key: InstanceKey) -> str:
    return f"no instance {key.instance_id!r} for tenant {key.tenant!r}"


def _refuse_final(record: InstanceRecord, action: str) -> None:
    if record.status.is_final:
        raise ControlError(
            f"instance {record.key.instance_id} is {record.status} and cannot be {action}"
        )


def _live_status(waiting: Waiting | None) -> InstanceStatus:
    if waiting is None or waiting.kind in (WaitKind.RETRY, WaitKind.THROTTLE):
        return InstanceStatus.RUNNING
    return InstanceStatus.SLEEPING if waiting.kind is WaitKind.SLEEP else InstanceStatus.WAITING
