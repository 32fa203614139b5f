"""What a guest run means for the instance: the engine's state machine."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from stepfleet.engine.decision import Decision
from stepfleet.engine.journal_checks import describe, journal_text, over_limits
from stepfleet.engine.state import EngineLimits, InstanceState
from stepfleet.schemas import (
    OPERATIONS,
    CallRequested,
    Completed,
    EntryFlags,
    EntryKind,
    ErrorKind,
    EventAwaited,
    FailedAttempt,
    GuestCrashed,
    GuestReport,
    InstanceStatus,
    JournalEntry,
    Nondeterministic,
    RunMode,
    SleepRequested,
    StepFailed,
    StepSucceeded,
    Waiting,
    WaitKind,
    WorkflowFailed,
)

__all__ = ["decide"]


def decide(
    state: InstanceState,
    journal: Sequence[JournalEntry],
    report: GuestReport,
    *,
    started_at: datetime,
    finished_at: datetime,
    limits: EngineLimits,
    pending: Sequence[JournalEntry] = (),
) -> Decision:
    """Turn one run's report into durable effects. Never raises: a guest that breaks the ABI
    errors its instance instead.

    Args:
        state: the instance as locked, before this delivery.
        journal: the committed journal.
        report: what the guest reported.
        pending: entries this delivery records before the run (an event, a timed-out wait).
    """
    return _Run(state, journal, report, started_at, finished_at, limits, pending).decide()


class _Run:
    """One decision in the making; methods name the outcomes."""

    def __init__(
        self,
        state: InstanceState,
        journal: Sequence[JournalEntry],
        report: GuestReport,
        started_at: datetime,
        finished_at: datetime,
        limits: EngineLimits,
        pending: Sequence[JournalEntry],
    ) -> None:
        self.state = state
        self.journal = journal
        self.report = report
        self.started_at = started_at
        self.finished_at = finished_at
        self.limits = limits
        self.entries: list[JournalEntry] = list(pending)
        base = len(journal) + len(pending)
        for offset, recorded in enumerate(report.recorded):
            self.entries.append(self._entry(base + offset, recorded.kind, "", recorded.value))
        self.length = base + len(report.recorded)
        """The journal length after the recorded values: the position of new work."""

    def decide(self) -> Decision:
        raw = self.report.outcome
        if isinstance(raw, CallRequested):
            raise ValueError("a run stopped at an HTTP call is resumed, not decided")
        outcome = journal_text(raw)
        if isinstance(outcome, str):
            return self._errored(ErrorKind.ABI_VIOLATION, outcome)
        if isinstance(outcome, Nondeterministic):
            return self._nondeterministic(outcome)
        if isinstance(outcome, GuestCrashed):
            where = outcome.where or f"the run failed at journal position {self.length}"
            if self.state.mode is RunMode.COMPENSATE:
                return self._errored(
                    ErrorKind.CRASHED,
                    f"{self.state.error}; compensations could not run: {where}: {outcome.message}",
                )
            return self._failed(ErrorKind.CRASHED, f"{where}: {outcome.message}")
        if isinstance(outcome, Completed | WorkflowFailed) and outcome.seq < self.length:
            return self._errored(
                ErrorKind.NONDETERMINISM,
                f"nondeterminism: the workflow finished after {outcome.seq} journal entries "
                f"but the journal holds {self.length}",
            )
        if outcome.seq != self.length:
            return self._errored(
                ErrorKind.ABI_VIOLATION,
                f"guest ABI violation: {type(outcome).__name__} reported at position "
                f"{outcome.seq}, the journal length is {self.length}",
            )
        if self.state.mode is RunMode.COMPENSATE:
            return self._compensating(outcome)
        match outcome:
            case StepSucceeded():
                if outcome.flags & EntryFlags.COMPENSATION:
                    return self._errored(
                        ErrorKind.ABI_VIOLATION,
                        "guest ABI violation: a compensation in forward mode",
                    )
                return self._step_done(
                    EntryKind.STEP_SUCCEEDED, outcome.name, outcome.result, outcome.flags
                )
            case StepFailed():
                return self._step_failed(outcome)
            case SleepRequested():
                return self._sleep(outcome)
            case EventAwaited():
                return self._wait(outcome)
            case Completed():
                return self._done(InstanceStatus.COMPLETE, output=outcome.output)
            case WorkflowFailed():
                return self._failed(
                    ErrorKind.WORKFLOW_FAILED, f"workflow failed: {outcome.message}"
                )

    # -- outcomes ------------------------------------------------------------------------

    def _step_done(
        self, kind: EntryKind, name: str, value: str, flags: EntryFlags = EntryFlags.NONE
    ) -> Decision:
        entry = self._entry(self.length, kind, name, value, self.state.attempt, flags)
        return self._go_on(entry)

    def _step_failed(self, outcome: StepFailed) -> Decision:
        config = outcome.config
        attempt = self.state.attempt
        if not outcome.non_retryable and attempt <= config.retry_limit:
            delay = min(config.delay_ms(attempt), self.limits.max_sleep_ms)
            failed = FailedAttempt(
                seq=self.length,
                name=outcome.name,
                attempt=attempt,
                error=outcome.message,
                started_at=self.started_at,
                finished_at=self.finished_at,
            )
            waiting = None
            if delay > 0:
                wake_at = self.finished_at + timedelta(milliseconds=delay)
                waiting = Waiting(WaitKind.RETRY, outcome.name, wake_at)
            return self._decision(
                InstanceStatus.RUNNING,
                attempt=attempt + 1,
                waiting=waiting,
                publish_step=waiting is None,
                failed_attempt=failed,
            )
        if self.state.mode is RunMode.COMPENSATE:
            return self._errored(
                ErrorKind.COMPENSATION_FAILED,
                f"{self.state.error}; compensation of step {outcome.name!r} failed after "
                f"{attempt} attempt(s): {outcome.message}",
            )
        return self._step_done(EntryKind.STEP_FAILED, outcome.name, outcome.message)

    def _sleep(self, outcome: SleepRequested) -> Decision:
        limit = self.limits.max_sleep_ms
        # Integers first: a guest may ask for any i64, far past what a datetime can hold.
        now_ms = _unix_ms(self.finished_at)
        length_ms = outcome.ms - now_ms if outcome.absolute else max(outcome.ms, 0)
        if length_ms > limit:
            return self._errored(
                ErrorKind.LIMIT,
                f"sleep {outcome.name!r} of {length_ms} ms is over the limit of {limit} ms",
            )
        if length_ms <= 0:
            # Already due: recorded as slept until then (or the epoch, for a time before it).
            due_ms = max(outcome.ms, 0) if outcome.absolute else now_ms
            return self._go_on(self._entry(self.length, EntryKind.SLEPT, outcome.name, str(due_ms)))
        due = self.finished_at + timedelta(milliseconds=length_ms)
        entry = self._entry(self.length, EntryKind.SLEPT, outcome.name, str(now_ms + length_ms))
        return self._decision(
            InstanceStatus.SLEEPING,
            entry=entry,
            waiting=Waiting(WaitKind.SLEEP, outcome.name, due),
        )

    def _wait(self, outcome: EventAwaited) -> Decision:
        timeout = outcome.timeout_ms
        if timeout is None:
            timeout = self.limits.default_event_timeout_ms
        if timeout > self.limits.max_sleep_ms:
            return self._errored(
                ErrorKind.LIMIT,
                f"wait {outcome.name!r} timeout of {timeout} ms is over the limit of "
                f"{self.limits.max_sleep_ms} ms",
            )
        timeout = max(timeout, 0)
        wake_at = self.finished_at + timedelta(milliseconds=timeout)
        waiting = Waiting(WaitKind.EVENT, outcome.name, wake_at, outcome.event_type, timeout)
        return self._decision(InstanceStatus.WAITING, waiting=waiting)

    def _compensating(self, outcome: object) -> Decision:
        match outcome:
            case StepSucceeded(flags=flags) if flags & EntryFlags.COMPENSATION:
                return self._step_done(EntryKind.COMPENSATED, outcome.name, outcome.result, flags)
            case StepFailed():
                return self._step_failed(outcome)
            case Completed():
                return self._done(
                    self.state.end_status or InstanceStatus.ERRORED, error=self.state.error
                )
        return self._errored(
            ErrorKind.ABI_VIOLATION,
            f"{self.state.error}; guest ABI violation while compensating: "
            f"{type(outcome).__name__} is not allowed in compensate mode",
        )

    def _nondeterministic(self, outcome: Nondeterministic) -> Decision:
        everything = [*self.journal, *self.entries]
        asked = f"{OPERATIONS.get(outcome.op, 'operation')} {outcome.name!r}"
        if not 0 <= outcome.seq < len(everything):
            return self._errored(
                ErrorKind.ABI_VIOLATION,
                f"guest ABI violation: nondeterminism reported at position {outcome.seq}, "
                f"the journal length is {len(everything)}",
            )
        recorded = everything[outcome.seq]
        return self._errored(
            ErrorKind.NONDETERMINISM,
            f"nondeterminism at journal position {outcome.seq}: the journal has "
            f"{describe(recorded)} but the workflow asked for {asked}",
        )

    def _failed(self, kind: ErrorKind, error: str) -> Decision:
        """The instance fails: run compensations first if a completed step has one."""
        rollbacks = any(
            e.kind is EntryKind.STEP_SUCCEEDED and e.flags & EntryFlags.HAS_ROLLBACK
            for e in (*self.journal, *self.entries)
        )
        if not rollbacks:
            return self._errored(kind, error)
        return self._decision(
            InstanceStatus.RUNNING,
            mode=RunMode.COMPENSATE,
            end_status=InstanceStatus.ERRORED,
            error=error,
            error_kind=kind,
            publish_step=True,
        )

    # -- building blocks -----------------------------------------------------------------

    def _go_on(self, entry: JournalEntry) -> Decision:
        return self._decision(InstanceStatus.RUNNING, entry=entry, publish_step=True)

    def _done(
        self, status: InstanceStatus, *, output: str | None = None, error: str | None = None
    ) -> Decision:
        return self._decision(status, output=output, error=error)

    def _errored(self, kind: ErrorKind, error: str) -> Decision:
        # Values recorded before the failure stay: compensations replay over them.
        return self._decision(
            InstanceStatus.ERRORED, error=error, error_kind=kind, check_limits=False
        )

    def _decision(
        self,
        status: InstanceStatus,
        *,
        entry: JournalEntry | None = None,
        attempt: int = 1,
        waiting: Waiting | None = None,
        mode: RunMode | None = None,
        end_status: InstanceStatus | None = None,
        output: str | None = None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
        publish_step: bool = False,
        failed_attempt: FailedAttempt | None = None,
        check_limits: bool = True,
    ) -> Decision:
        entries = (*self.entries, entry) if entry is not None else tuple(self.entries)
        position = len(self.journal) + len(entries)
        state_bytes = self.state.state_bytes + sum(len(e.value.encode()) for e in entries)
        over = over_limits(position, state_bytes, self.limits) if check_limits else None
        if over:
            # Nothing of this run is recorded: the instance stops where it stood.
            entries, position, state_bytes = (), len(self.journal), self.state.state_bytes
            status, waiting, publish_step, output, error, error_kind = (
                InstanceStatus.ERRORED,
                None,
                False,
                None,
                over,
                ErrorKind.LIMIT,
            )
        if mode is None:
            mode = self.state.mode
        if mode is RunMode.COMPENSATE and end_status is None:
            end_status = self.state.end_status
        if error is None and mode is RunMode.COMPENSATE and not status.is_final:
            error = self.state.error
        return Decision(
            status=status,
            position=position,
            entries=entries,
            attempt=attempt,
            waiting=waiting,
            mode=mode,
            end_status=end_status,
            output=output,
            error=error,
            error_kind=error_kind,
            publish_step=publish_step,
            failed_attempt=failed_attempt,
            state_bytes=state_bytes,
        )

    def _entry(
        self,
        seq: int,
        kind: EntryKind,
        name: str,
        value: str,
        attempt: int = 1,
        flags: EntryFlags = EntryFlags.NONE,
    ) -> JournalEntry:
        return JournalEntry(
            seq=seq,
            kind=kind,
            name=name,
            value=value,
            attempt=attempt,
            started_at=self.started_at,
            finished_at=self.finished_at,
            flags=flags,
        )


def _unix_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
