"""Whether a message may run a step of an instance, given the instance's current state.

Delivery is at-least-once, so a message that arrives twice, late or out of order must be
recognised here and acknowledged without effect; the journal position makes that exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepfleet.engine.state import InstanceState
from stepfleet.schemas import CreateBody, Envelope, InstanceStatus, StepBody, WakeBody


@dataclass(frozen=True, slots=True)
class Admit:
    """Run the guest for the next step."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already handled (a redelivery, a repeated create, or an instance that moved on)."""

    why: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Never processable: dead-letter it with `reason` and `detail`."""

    reason: str
    detail: str


Admission = Admit | Duplicate | Reject


def admit(envelope: Envelope, state: InstanceState | None, *, created_now: bool) -> Admission:
    """Decide what to do with a valid message for an instance.

    Args:
        envelope: the validated message.
        state: the locked instance row, or None when no such instance exists.
        created_now: True when this very message inserted the instance (creates only).
    """
    if state is None:
        return Reject("unknown-instance", f"no instance {envelope.instance_id!r} for this tenant")
    if envelope.module is not None and envelope.module != state.module:
        # Headers are hints; the pinned digest on the row is the truth.
        return Reject(
            "module-mismatch",
            f"message names module {envelope.module} but the instance runs {state.module}",
        )
    body = envelope.body
    if isinstance(body, CreateBody):
        if created_now:
            return Admit()
        return Duplicate("instance already exists")
    if isinstance(body, StepBody | WakeBody):
        if body.position < state.position:
            return Duplicate(f"position {body.position} is behind the journal ({state.position})")
        if body.position > state.position:
            return Reject(
                "position-ahead",
                f"message expects journal position {body.position}, "
                f"the instance is at {state.position}",
            )
        if state.status is not InstanceStatus.RUNNING:
            return Duplicate(f"instance is {state.status}")
        return Admit()
    return Reject("unsupported-kind", f"{envelope.kind} messages are not handled yet")
