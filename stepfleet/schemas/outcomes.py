"""What one guest run reported, as the sandbox hands it to the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepfleet.schemas.egress import AnsweredCall, HttpRequest
from stepfleet.schemas.instance import DEFAULT_STEP_CONFIG, StepConfig
from stepfleet.schemas.journal import EntryFlags, EntryKind


@dataclass(frozen=True, slots=True)
class StepSucceeded:
    """The step begun at `seq` returned `result` (JSON text)."""

    seq: int
    name: str
    result: str
    flags: EntryFlags = EntryFlags.NONE
    config: StepConfig = DEFAULT_STEP_CONFIG


@dataclass(frozen=True, slots=True)
class StepFailed:
    """The step begun at `seq` failed with `message` (a breached limit is named in `limit`)."""

    seq: int
    name: str
    message: str
    non_retryable: bool = False
    config: StepConfig = DEFAULT_STEP_CONFIG
    limit: str | None = None


@dataclass(frozen=True, slots=True)
class SleepRequested:
    """The program sleeps `name` at `seq`: for `ms` milliseconds, or until Unix ms if absolute."""

    seq: int
    name: str
    ms: int
    absolute: bool = False


@dataclass(frozen=True, slots=True)
class EventAwaited:
    """The program waits `name` at `seq` for an event of `event_type` (None: default timeout)."""

    seq: int
    name: str
    event_type: str
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Completed:
    """The program returned `output` (JSON text) after `seq` entries; in compensate mode,
    every compensation has run."""

    seq: int
    output: str


@dataclass(frozen=True, slots=True)
class WorkflowFailed:
    """The program gave up with `message`."""

    seq: int
    message: str


OPERATIONS = {1: "step", 2: "sleep", 3: "wait for event", 4: "now", 5: "random", 6: "compensation"}


@dataclass(frozen=True, slots=True)
class Nondeterministic:
    """At journal position `seq` the program asked for `op` named `name`; the journal differs."""

    seq: int
    name: str
    op: int = 1


@dataclass(frozen=True, slots=True)
class GuestCrashed:
    """The run ended without a valid outcome: a trap, a breached limit or an ABI violation.

    `limit` names the breached limit (`cpu`, `memory`, `stack`, `output`, ...) or is None.
    `where` says what failed, as the start of the instance's error: "step 'NAME' attempt N
    failed", "the workflow code failed between steps, at journal position N", "the workflow's
    return value was refused"; None when the run failed before any workflow code ran (a
    module refused, a host error).
    """

    message: str
    limit: str | None = None
    where: str | None = None


GuestOutcome = (
    StepSucceeded
    | StepFailed
    | SleepRequested
    | EventAwaited
    | Completed
    | WorkflowFailed
    | Nondeterministic
    | GuestCrashed
)


@dataclass(frozen=True, slots=True)
class CallRequested:
    """The run stopped at an HTTP call inside step `name` at `seq`: not an outcome yet.

    The host makes the call (no transaction is open, no row is locked), then runs the guest
    again with `answered` and the call's answer, so the step sees every answer in order.
    """

    seq: int
    name: str
    request: HttpRequest
    answered: tuple[AnsweredCall, ...]
    """The answers of this attempt's earlier calls, in order."""
    deadline: float
    """When the step's timeout runs out, in `time.monotonic()` seconds of this process."""


RunOutcome = GuestOutcome | CallRequested
"""How one run ends: an outcome for the engine, or a call to make before the run goes on."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """A value the run recorded before its outcome (`now` or `random`) at journal `seq`."""

    seq: int
    kind: EntryKind
    value: str


@dataclass(frozen=True, slots=True)
class GuestReport:
    """Everything one run produced: its outcome, recorded values and log lines."""

    outcome: RunOutcome
    recorded: tuple[Recorded, ...] = ()
    logs: list[tuple[int, str]] = field(default_factory=list)
    fuel_used: int = 0
    """Fuel the run consumed (0 when not measured)."""
