"""Whether a message may run a step of an instance, given the instance's current state.

Delivery is at-least-once, so a message that arrives twice, late or out of order must be
recognised here and acknowledged without effect; journal position, attempt and generation
make that exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from stepfleet.engine.state import InstanceState
from stepfleet.schemas import (
    CreateBody,
    DeadReason,
    EntryKind,
    Envelope,
    EventBody,
    InstanceStatus,
    JournalEntry,
    StepBody,
    WaitKind,
    WakeBody,
)


@dataclass(frozen=True, slots=True)
class Admit:
    """Run the guest; `resolution` is recorded first (an event, a wait that timed out)."""

    resolution: JournalEntry | None = None
    woken: bool = False
    """The message ends the instance's wait (a timer or a matching event)."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already handled (a redelivery, a repeated create, or an instance that moved on)."""

    why: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Never processable: dead-letter it with `reason` and `detail`."""

    reason: DeadReason
    detail: str


@dataclass(frozen=True, slots=True)
class Keep:
    """An event for an instance that is not waiting for it now: store it for a later wait."""


Admission = Admit | Duplicate | Reject | Keep


def admit(
    envelope: Envelope, state: InstanceState | None, *, created_now: bool, now: datetime
) -> Admission:
    """Decide what to do with a valid message for an instance.

    Args:
        envelope: the validated message.
        state: the locked instance row, or None when no such instance exists.
        created_now: True when this very message inserted the instance (creates only).
        now: the worker's clock, for the entry an expired wait records.
    """
    if state is None:
        return Reject(
            DeadReason.UNKNOWN_INSTANCE, f"no instance {envelope.instance_id!r} for this tenant"
        )
    body = envelope.body
    if isinstance(body, CreateBody):
        if envelope.module != state.module:
            # A create repeated with other code is a mistake the producer must hear about.
            return Reject(
                DeadReason.MODULE_MISMATCH,
                f"message names module {envelope.module} but the instance runs {state.module}",
            )
        return Admit() if created_now else Duplicate("instance already exists")
    # Otherwise x-module is a hint: the digest pinned on the row runs (an operator may have
    # moved the instance to other code since the message was sent).
    if isinstance(body, EventBody):
        return _event(body, state, now)
    if body.generation != state.generation:
        return Duplicate(f"sent before the instance was restarted (generation {body.generation})")
    if body.position < state.position:
        return Duplicate(f"position {body.position} is behind the journal ({state.position})")
    if body.position > state.position:
        return Reject(
            DeadReason.POSITION_AHEAD,
            f"message expects journal position {body.position}, the instance is at {state.position}",
        )
    if state.status.is_final or state.status is InstanceStatus.PAUSED:
        return Duplicate(f"instance is {state.status}")
    if isinstance(body, StepBody):
        if state.waiting is not None:
            return Duplicate(f"instance waits ({state.waiting.kind}) until {state.waiting.wake_at}")
        return Admit()
    return _wake(body, state, now)


def _wake(body: WakeBody, state: InstanceState, now: datetime) -> Admission:
    waiting = state.waiting
    if waiting is None or body.attempt != state.attempt:
        return Duplicate("the timer this wake was sent for is gone")
    if body.due_us is not None and body.due_us != due_us(waiting.wake_at):
        # A wake of an earlier timer at this position (a sleep's, redelivered or sent again
        # while the instance already waits for something else).
        return Duplicate("the wake is for an earlier timer")
    if waiting.kind is WaitKind.EVENT:
        message = f"wait {waiting.name!r} for event {waiting.event_type!r} timed out"
        if waiting.timeout_ms is not None:
            message += f" after {waiting.timeout_ms} ms"
        entry = _entry(state, EntryKind.EVENT_TIMED_OUT, waiting.name, message, now)
        return Admit(resolution=entry, woken=True)
    return Admit(woken=True)


def _event(body: EventBody, state: InstanceState, now: datetime) -> Admission:
    if state.status.is_final:
        return Reject(
            DeadReason.INSTANCE_FINISHED,
            f"instance is {state.status}; it takes no more events (event {body.event_id!r})",
        )
    if matches_wait(state, body.type):
        assert state.waiting is not None
        entry = _entry(state, EntryKind.EVENT_RECEIVED, state.waiting.name, _payload(body), now)
        return Admit(resolution=entry, woken=True)
    return Keep()


def due_us(when: datetime) -> int:
    """A timer's due time as wake messages carry it: Unix microseconds."""
    return round(when.timestamp() * 1_000_000)


def matches_wait(state: InstanceState, event_type: str) -> bool:
    """Tell whether an event of `event_type` ends the instance's current wait."""
    waiting = state.waiting
    return (
        waiting is not None
        and waiting.kind is WaitKind.EVENT
        and waiting.event_type == event_type
        and state.status is not InstanceStatus.PAUSED
        and not state.status.is_final
    )


def event_entry(state: InstanceState, payload: str, now: datetime) -> JournalEntry:
    """The entry that ends the instance's wait with an event's payload (JSON text)."""
    assert state.waiting is not None
    return _entry(state, EntryKind.EVENT_RECEIVED, state.waiting.name, payload, now)


def _payload(body: EventBody) -> str:
    return json.dumps(body.payload, separators=(",", ":"))


def check_size(what: str, text: str, limit: int) -> Reject | None:
    """Refuse params or an event payload over the value limit, saying by how much."""
    size = len(text.encode())
    if size > limit:
        return Reject(DeadReason.OVER_LIMIT, f"{what} are {size} bytes, the limit is {limit}")
    return None


def _entry(
    state: InstanceState, kind: EntryKind, name: str, value: str, now: datetime
) -> JournalEntry:
    return JournalEntry(
        seq=state.position,
        kind=kind,
        name=name,
        value=value,
        attempt=1,
        started_at=now,
        finished_at=now,
    )
