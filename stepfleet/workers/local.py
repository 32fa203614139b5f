"""The local runner: one workflow in one process with the fleet's step cycle, over the
in-memory store and with no RabbitMQ. Time is virtual, so sleeps, retry delays and event
timeouts pass at once; events given up front are sent right after the create.

The runner is a one-queue broker around `StepCycle`: it runs the create, then every step
message the cycle publishes, then the events; when nothing is queued it moves the clock to
the instance's timer and sends the wake the timer loop would.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from stepfleet.broker import Outgoing, Topology
from stepfleet.cycle.calls import CallScheduler
from stepfleet.cycle.messages import wake_message
from stepfleet.cycle.step import StepCycle
from stepfleet.cycle.work import Ran, Work
from stepfleet.engine import EngineLimits
from stepfleet.sandbox import WasmSandbox
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.schemas import (
    SCHEMA_VERSION,
    CreateBody,
    EntryKind,
    Envelope,
    EventBody,
    FailedAttempt,
    InstanceKey,
    InstanceStatus,
    JournalEntry,
    MessageKind,
    WaitKind,
    digest_of,
    parse_envelope,
)
from stepfleet.store import MemoryStore

TENANT = "local"

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
_LEVELS = ("debug", "info", "warn", "error")


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
        self.at = datetime.now(UTC)

    def now(self) -> datetime:
        return self.at

    def seconds(self) -> float:
        return self.at.timestamp()

    def advance_to(self, when: datetime) -> None:
        self.at = max(self.at, when)


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
    clock = _VirtualClock()
    sandbox = WasmSandbox(sandbox_limits, clock=clock.seconds)
    try:
        digest = digest_of(wasm)
        sandbox.load(digest, wasm)
        store = MemoryStore(clock=clock.now)
        cycle = StepCycle(
            store=store, sandbox=sandbox, topology=Topology(TENANT), limits=limits, clock=clock.now
        )
        local = _Local(cycle, store, clock, say, InstanceKey(TENANT, instance_id), digest)
        # The runner says what happens in its own words; the cycle's log lines stay quiet.
        with structlog.testing.capture_logs():
            return asyncio.run(local.run(wasm, params, events))
    finally:
        sandbox.close()


class _Local:
    def __init__(
        self,
        cycle: StepCycle,
        store: MemoryStore,
        clock: _VirtualClock,
        say: Callable[[str], None],
        key: InstanceKey,
        digest: str,
    ) -> None:
        self.cycle = cycle
        self.store = store
        self.clock = clock
        self.say = say
        self.key = key
        self.digest = digest
        self.queue: deque[Work[None]] = deque()
        # No egress gateway here: a guest's HTTP call is answered "egress is not configured".
        self.calls = CallScheduler(None, max_in_flight=1, tenant_cap=lambda _: 1)

    async def run(self, wasm: bytes, params: str, events: Sequence[tuple[str, str]]) -> LocalResult:
        await self.store.put_module(TENANT, self.digest, wasm)
        create = CreateBody(version=SCHEMA_VERSION, params=json.loads(params))
        await self._send(Work(None, self._envelope(MessageKind.CREATE, create, self.digest)))
        for index, (event_type, payload) in enumerate(events):
            body = EventBody(
                version=SCHEMA_VERSION,
                event_id=f"local-event-{index}",
                type=event_type,
                payload=json.loads(payload),
            )
            self.queue.append(Work(None, self._envelope(MessageKind.EVENT, body, None)))
        while await self._next():
            await self._send(self.queue.popleft())
        detail = await self.store.detail(self.key)
        assert detail is not None
        record = detail.record
        self.say(f"{record.status}: {record.output if record.output is not None else record.error}")
        return LocalResult(
            record.status, record.output, record.error, detail.journal, detail.attempts
        )

    async def _next(self) -> bool:
        """Whether there is a message to send; when none is queued, fire the next timer."""
        if self.queue:
            return True
        detail = await self.store.detail(self.key)
        assert detail is not None
        waiting = detail.record.waiting
        if detail.record.status.is_final or waiting is None:
            return False
        self.clock.advance_to(waiting.wake_at)
        for timer in await self.store.due_timers(limit=1, resend_after_seconds=0):
            self._queue(wake_message(self.cycle.topology, timer))
        return bool(self.queue)

    async def _send(self, work: Work[None]) -> None:
        result = await self.cycle.run([work])
        for suspended in result.suspended:  # its step waits on a call: answer it, run again
            self.queue.appendleft(await self.calls.answer(suspended))
        for item in result.ran:
            self._show(item)
        for refused in result.rejected:
            self.say(f"  {refused.work.envelope.kind} refused: {refused.detail}")
        for message in result.messages:
            self._queue(message)
        await self.store.delete_outbox(result.outbox_ids)

    def _queue(self, message: Outgoing) -> None:
        envelope = parse_envelope(message.headers, message.body, max_body_bytes=1 << 30)
        self.queue.append(Work(None, envelope))

    def _envelope(
        self, kind: MessageKind, body: CreateBody | EventBody, module: str | None
    ) -> Envelope:
        return Envelope(
            kind=kind,
            tenant=self.key.tenant,
            instance_id=self.key.instance_id,
            module=module,
            body=body,
        )

    def _show(self, item: Ran[None]) -> None:
        for level, line in item.report.logs:
            self.say(f"      log[{_LEVELS[level]}] {line}")
        decision = item.decision
        assert decision is not None
        for entry in decision.entries:
            self._show_entry(entry)
        if (failed := decision.failed_attempt) is not None:
            delay = (
                f"in {(decision.waiting.wake_at - self.clock.at) / timedelta(milliseconds=1):.0f}"
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

    def _show_entry(self, entry: JournalEntry) -> None:
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
