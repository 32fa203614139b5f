"""Running a guest for one step and deciding what its outcome means.

`run_step` is the one place a replay buffer is built and a guest run; the engine's `decide`
turns its report into a decision. The cycle does both for every admitted message; module-move
dry runs do both on an instance's committed journal with another module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from stepfleet.cycle.context import message_context
from stepfleet.cycle.replays import CachedReplay
from stepfleet.cycle.work import Ran, Work
from stepfleet.engine import InstanceState
from stepfleet.sandbox import GuestRun, Sandbox, encode_replay_buffer
from stepfleet.schemas import AnsweredCall, GuestReport, JournalEntry, TenantLimits

log = structlog.get_logger("stepfleet.worker")

_GUEST_LEVELS = ("debug", "info", "warning", "error")


def run_step(
    sandbox: Sandbox,
    state: InstanceState,
    replay: CachedReplay,
    *,
    pending: Sequence[JournalEntry] = (),
    limits: TenantLimits | None = None,
    answers: tuple[AnsweredCall, ...] = (),
    step_deadline: float | None = None,
    fuel_cap: int | None = None,
) -> GuestReport:
    """Run `state.module` over the instance's journal (and `pending`) to its next outcome;
    `fuel_cap` lowers the run's fuel below the tenant's and the sandbox's.

    Called on the thread that drives the sandbox.
    """
    job = guest_run(
        state,
        replay,
        pending=pending,
        limits=limits,
        answers=answers,
        step_deadline=step_deadline,
        fuel_cap=fuel_cap,
    )
    return sandbox.run(job)


def guest_run(
    state: InstanceState,
    replay: CachedReplay,
    *,
    pending: Sequence[JournalEntry] = (),
    limits: TenantLimits | None = None,
    answers: tuple[AnsweredCall, ...] = (),
    step_deadline: float | None = None,
    fuel_cap: int | None = None,
) -> GuestRun:
    """The run `run_step` performs (see there)."""
    journal = replay.journal
    buffer = encode_replay_buffer(
        state.key.instance_id,
        replay.params,
        journal,
        pending=pending,
        mode=state.mode,
        attempt=state.attempt,
    )
    own = limits or TenantLimits()
    fuel = own.fuel_per_run
    if fuel_cap is not None and (fuel is None or fuel > fuel_cap):
        fuel = fuel_cap
    return GuestRun(
        state.module,
        buffer,
        len(journal) + len(pending),
        state.attempt,
        fuel_per_run=fuel,
        memory_bytes=own.memory_bytes,
        tenant=state.key.tenant,
        instance=state.key.instance_id,
        host_calls_per_step=own.host_calls_per_step,
        answers=answers,
        step_deadline=step_deadline,
    )


def run_works(
    sandbox: Sandbox,
    works: list[Work[Any]],
    limits: Callable[[str], TenantLimits],
    clock: Callable[[], datetime],
) -> list[Ran[Any]]:
    """Run every admitted work's guest, one after another, on the sandbox's thread."""
    return [run_work(sandbox, work, limits, clock) for work in works]


def run_work(
    sandbox: Sandbox,
    work: Work[Any],
    limits: Callable[[str], TenantLimits],
    clock: Callable[[], datetime],
    *,
    fuel_cap: int | None = None,
) -> Ran[Any]:
    """Run one admitted work's guest (see `run_step` for `fuel_cap`)."""
    assert work.replay is not None
    assert work.state is not None
    # No log context bound here: nothing on this thread logs per message (the sandbox's
    # own line names the tenant and module), and binding costs on every run.
    started_at = work.started_at or clock()
    report = run_step(
        sandbox,
        work.state,
        work.replay,
        pending=work.pending,
        limits=limits(work.key.tenant),
        answers=work.answers,
        step_deadline=work.step_deadline,
        fuel_cap=fuel_cap,
    )
    return Ran(work, report, started_at, clock())


def work_run(work: Work[Any], limits: Callable[[str], TenantLimits]) -> GuestRun:
    """The run of one admitted work, with the tenant's whole budget."""
    assert work.replay is not None
    assert work.state is not None
    return guest_run(
        work.state,
        work.replay,
        pending=work.pending,
        limits=limits(work.key.tenant),
        answers=work.answers,
        step_deadline=work.step_deadline,
    )


def ran_out_of_fuel(report: GuestReport) -> bool:
    """Whether the run was stopped by its fuel (CPU) limit."""
    return getattr(report.outcome, "limit", None) == "cpu"


def log_run(item: Ran[Any]) -> None:
    """Log what one run did: its guest's lines, then the decision, under its context."""
    work, decision = item.work, item.decision
    assert work.state is not None
    assert decision is not None
    entry = decision.step_entry
    failed = decision.failed_attempt
    with message_context(
        work,
        step=failed.name if failed else entry.name if entry else None,
        attempt=failed.attempt if failed else entry.attempt if entry else None,
        position=work.state.position,
    ):
        for level, line in item.report.logs:
            getattr(log, _GUEST_LEVELS[level])("guest_log", message=line)
        ms = round((item.finished_at - item.started_at) / timedelta(milliseconds=1), 3)
        status = decision.status.value
        if decision.error is not None and decision.status.is_final:
            log.warning("instance_errored", status=status, error=decision.error, ms=ms)
        elif failed is not None:
            retry_at = decision.waiting.wake_at.isoformat() if decision.waiting else "now"
            log.info("step_attempt_failed", error=failed.error, retry_at=retry_at, ms=ms)
        elif decision.waiting is not None:
            log.info(
                "instance_parked",
                status=status,
                waits_for=decision.waiting.kind.value,
                name=decision.waiting.name,
                wake_at=decision.waiting.wake_at.isoformat(),
                ms=ms,
            )
        elif entry is not None:
            log.info("step_recorded", status=status, kind=entry.kind.name.lower(), ms=ms)
        elif decision.mode is not work.state.mode:
            log.warning("compensations_started", error=decision.error, ms=ms)
        else:
            log.info("instance_finished", status=status, ms=ms)
