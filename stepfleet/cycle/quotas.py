"""Tenant quotas: hold back the steps over a tenant's running-steps or rate limit.

A held-back instance is parked (its timer fires shortly) instead of run, so the flood leaves
the queue at once and other tenants' messages behind it are reached quickly. Messages that
carry an event or a timed-out wait always run.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import structlog

from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.work import H, Work
from stepfleet.schemas import InstanceStatus, RunMode, Waiting, WaitKind
from stepfleet.store import StepWrite
from stepfleet.store.port import StepTx

log = structlog.get_logger("stepfleet.worker")

_SLOT_RETRY = timedelta(milliseconds=100)
_RATE_HOLD = "rate"
"""The name of a throttle wait whose token is already taken."""


async def apply_quotas(
    tx: StepTx, directory: TenantDirectory, admitted: list[Work[H]], now: datetime
) -> tuple[list[Work[H]], list[StepWrite]]:
    """Split the admitted works into those that run now and the writes that park the rest."""
    needs: dict[str, list[Work[H]]] = {}
    for work in admitted:
        own = directory.limits(work.key.tenant)
        # A resumed attempt passed its quotas when it began.
        if (own.running_steps or own.steps_per_second) and not work.pending and not work.answers:
            needs.setdefault(work.key.tenant, []).append(work)
    if not needs:
        return admitted, []
    held: list[StepWrite] = []
    held_ids: set[int] = set()
    for tenant, works in needs.items():
        own = directory.limits(tenant)
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


def _jitter() -> timedelta:
    return timedelta(milliseconds=random.uniform(0, 100))


def _prepaid(work: Work[Any]) -> bool:
    waiting = work.record.waiting if work.record is not None else None
    return waiting is not None and waiting.kind is WaitKind.THROTTLE and waiting.name == _RATE_HOLD


def _held(work: Work[Any], wake_at: datetime, *, prepaid: bool = False) -> StepWrite:
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
