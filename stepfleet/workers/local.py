"""The local runner: one workflow in one process with the fleet's engine and sandbox, and no
RabbitMQ or PostgreSQL. Time is virtual, so sleeps, retry delays and event timeouts pass at
once; events given up front count as sent before the workflow started.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from stepfleet.engine import (
    Admit,
    Decision,
    EngineLimits,
    InstanceState,
    admit,
    decide,
    due_us,
    resolve_wait,
)
from stepfleet.sandbox import GuestRun, ReplayJournal, WasmSandbox, encode_replay_buffer
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.schemas import (
    SCHEMA_VERSION,
    EntryKind,
    Envelope,
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    MessageKind,
    WaitKind,
    WakeBody,
    digest_of,
)

_KIND_WORDS = {
    EntryKind.STEP_SUCCEEDED: "step",
    EntryKind.STEP_FAILED: "step failed",
    EntryKind.SLEPT: "sleep",
    EntryKind.EVENT_RECEIVED: "event",
    EntryKind.EVENT_TIMED_OUT: "wait timed out",
    EntryKind.NOW: "now",
    EntryKind.RANDOM: "random",
    EntryKind.COMPENSATED: "compensated",
}


@dataclass(slots=True)
class LocalResult:
    """How a local run ended."""

    status: InstanceStatus
    output: str | None
    error: str | None
    journal: list[JournalEntry] = field(default_factory=list)
    attempts: list[FailedAttempt] = field(default_factory=list)


class _VirtualClock:
    """Real time at the start, then moved forward to every timer the workflow waits for."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def seconds(self) -> float:
        return self.now.timestamp()

    def advance_to(self, when: datetime) -> None:
        self.now = max(self.now, when)


def run_locally(
    wasm: bytes,
    params: str,
    *,
    events: Sequence[tuple[str, str]] = (),
    instance_id: str = "local",
    say: Callable[[str], None] = print,
    limits: EngineLimits | None = None,
    sandbox_limits: SandboxLimits | None = None,
) -> LocalResult:
    """Run a module to completion or failure, printing each step as it happens.

    Args:
        wasm: the module's bytes (validated like a push).
        params: the params as JSON text.
        events: (type, payload JSON) pairs, delivered in order to waits of their type.

    Raises:
        InvalidModule: the module would be refused by a push.
    """
    limits = limits or EngineLimits()
    clock = _VirtualClock()
    sandbox = WasmSandbox(sandbox_limits, clock=clock.seconds)
    try:
        digest = digest_of(wasm)
        sandbox.load(digest, wasm)
        return _Local(sandbox, digest, instance_id, params, list(events), clock, limits, say).run()
    finally:
        sandbox.close()


class _Local:
    def __init__(
        self,
        sandbox: WasmSandbox,
        digest: str,
        instance_id: str,
        params: str,
        events: list[tuple[str, str]],
        clock: _VirtualClock,
        limits: EngineLimits,
        say: Callable[[str], None],
    ) -> None:
        self.sandbox = sandbox
        self.digest = digest
        self.params = params
        self.events = events
        self.clock = clock
        self.limits = limits
        self.say = say
        self.journal = ReplayJournal()
        self.attempts: list[FailedAttempt] = []
        self.state = InstanceState(
            key=InstanceKey("local", instance_id),
            module=digest,
            status=InstanceStatus.RUNNING,
            position=0,
            state_bytes=len(params.encode()),
        )

    def run(self) -> LocalResult:
        decision: Decision | None = None
        while decision is None or not decision.status.is_final:
            pending = self._end_wait()
            state = self.state
            buffer = encode_replay_buffer(
                state.key.instance_id,
                self.params,
                self.journal,
                pending=pending,
                mode=state.mode,
                attempt=state.attempt,
            )
            started = self.clock.now
            report = self.sandbox.run(
                GuestRun(self.digest, buffer, len(self.journal) + len(pending), state.attempt)
            )
            for level, line in report.logs:
                self.say(f"      log[{('debug', 'info', 'warn', 'error')[level]}] {line}")
            decision = decide(
                state,
                self.journal.entries,
                report,
                started_at=started,
                finished_at=self.clock.now,
                limits=self.limits,
                pending=pending,
            )
            decision = self._take_event(decision)
            self._record(decision)
        self.say(
            f"{decision.status}: {decision.output if decision.output is not None else decision.error}"
        )
        return LocalResult(
            decision.status, decision.output, decision.error, self.journal.entries, self.attempts
        )

    def _end_wait(self) -> tuple[JournalEntry, ...]:
        """Let the instance's timer fire (virtually), or hand its wait the next event."""
        waiting = self.state.waiting
        if waiting is None:
            return ()
        if waiting.kind is WaitKind.EVENT and (payload := self._next_event(waiting.event_type)):
            entry = JournalEntry(
                self.state.position,
                EntryKind.EVENT_RECEIVED,
                waiting.name,
                payload,
                started_at=self.clock.now,
                finished_at=self.clock.now,
            )
            self.state = replace(self.state, waiting=None)
            return (entry,)
        self.clock.advance_to(waiting.wake_at)
        wake = Envelope(
            kind=MessageKind.WAKE,
            tenant=self.state.key.tenant,
            instance_id=self.state.key.instance_id,
            module=self.digest,
            body=WakeBody(
                version=SCHEMA_VERSION,
                position=self.state.position,
                attempt=self.state.attempt,
                generation=self.state.generation,
                due_us=due_us(waiting.wake_at),
            ),
        )
        verdict = admit(wake, self.state, created_now=False, now=self.clock.now)
        assert isinstance(verdict, Admit)
        self.state = replace(self.state, waiting=None)
        return () if verdict.resolution is None else (verdict.resolution,)

    def _next_event(self, event_type: str | None) -> str | None:
        for index, (kind, payload) in enumerate(self.events):
            if kind == event_type:
                del self.events[index]
                return payload
        return None

    def _take_event(self, decision: Decision) -> Decision:
        waiting = decision.waiting
        if waiting is None or waiting.kind is not WaitKind.EVENT:
            return decision
        payload = self._next_event(waiting.event_type)
        if payload is None:
            return decision
        return resolve_wait(decision, payload, self.clock.now, self.limits)

    def _record(self, decision: Decision) -> None:
        for entry in decision.entries:
            if entry.seq >= len(self.journal):
                self.journal.append(entry)
                self._show(entry)
        if decision.failed_attempt is not None:
            failed = decision.failed_attempt
            self.attempts.append(failed)
            delay = (
                f"in {(decision.waiting.wake_at - self.clock.now) / timedelta(milliseconds=1):.0f}"
                " ms (skipped)"
                if decision.waiting
                else "now"
            )
            self.say(
                f"  [{failed.seq}] step {failed.name} attempt {failed.attempt} failed: "
                f"{failed.error}; retry {delay}"
            )
        waiting = decision.waiting
        if waiting is not None and waiting.kind is WaitKind.EVENT:
            self.say(f"  [{decision.position}] waiting for event {waiting.event_type!r}")
        self.state = InstanceState(
            key=self.state.key,
            module=self.digest,
            status=decision.status,
            position=decision.position,
            generation=self.state.generation,
            attempt=decision.attempt,
            waiting=waiting,
            mode=decision.mode,
            end_status=decision.end_status,
            error=decision.error,
            state_bytes=decision.state_bytes,
        )

    def _show(self, entry: JournalEntry) -> None:
        if entry.kind is EntryKind.SLEPT:
            until = datetime.fromtimestamp(int(entry.value) / 1000, UTC).isoformat()
            detail = f"until {until} (skipped)"
        else:
            detail = f"-> {entry.shown_value}"
        name = f" {entry.name}" if entry.name else ""
        attempt = f" (attempt {entry.attempt})" if entry.attempt > 1 else ""
        self.say(f"  [{entry.seq}] {_KIND_WORDS[entry.kind]}{name}{attempt} {detail}")


def parse_event(text: str) -> tuple[str, str]:
    """Parse a `TYPE=JSON` event argument into (type, payload JSON).

    Raises:
        ValueError: no `=`, an empty type, or a payload that is not JSON.
    """
    event_type, sep, payload = text.partition("=")
    if not sep or not event_type:
        raise ValueError(f"event {text!r} must look like TYPE=JSON")
    try:
        value = json.loads(payload)
    except ValueError:
        raise ValueError(f"event {event_type!r}: payload is not valid JSON") from None
    return event_type, json.dumps(value, separators=(",", ":"))
