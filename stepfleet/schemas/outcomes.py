"""What one guest run reported, as the sandbox hands it to the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepSucceeded:
    """The first step not in the journal ran and returned `result` (JSON text)."""

    seq: int
    name: str
    result: str


@dataclass(frozen=True, slots=True)
class StepFailed:
    """The first step not in the journal ran and failed with `message`."""

    seq: int
    name: str
    message: str
    non_retryable: bool = False


@dataclass(frozen=True, slots=True)
class Completed:
    """The program returned `output` (JSON text) after replaying `seq` entries."""

    seq: int
    output: str


@dataclass(frozen=True, slots=True)
class WorkflowFailed:
    """The program gave up with `message`."""

    seq: int
    message: str


@dataclass(frozen=True, slots=True)
class Nondeterministic:
    """At journal position `seq` the program asked for step `name`; the journal holds another."""

    seq: int
    name: str


@dataclass(frozen=True, slots=True)
class GuestCrashed:
    """The run ended without a valid outcome: a trap, a breached limit or an ABI violation.

    `limit` names the breached limit (`cpu`, `memory`, `stack`, `output`, ...) or is None.
    """

    message: str
    limit: str | None = None


GuestOutcome = (
    StepSucceeded | StepFailed | Completed | WorkflowFailed | Nondeterministic | GuestCrashed
)
