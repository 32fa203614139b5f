"""The instruments' port: what the fleet tells its metrics and traces, in plain values.

The step cycle and the worker call an `Observer`; this base class does nothing, so a worker
with neither metrics nor traces configured pays one method call per hook and batch. The
Prometheus side (`metrics.py`) and the OpenTelemetry side (`tracing.py`) are the only
modules that import those libraries; `Instruments` (`instruments.py`) puts them together.

Times are given as they are taken: durations in seconds, span boundaries in Unix
nanoseconds (`wall_ns`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

PHASES: Final = ("inbox", "checks", "transaction", "guest", "publish", "ack")
"""The phases of a batch, as `stepfleet_step_phase_seconds` labels them (cycle/phases.py)."""

_WALL_OFFSET: Final = time.time() - time.monotonic()


def wall_ns(monotonic_seconds: float) -> int:
    """A `time.monotonic()` reading as Unix nanoseconds (for span boundaries)."""
    return int((monotonic_seconds + _WALL_OFFSET) * 1e9)


Attributes = dict[str, str | int]


class Span:
    """An open delivery span: its trace context for the messages it causes."""

    __slots__ = ("traceparent",)

    def __init__(self, traceparent: str) -> None:
        self.traceparent = traceparent


@dataclass(frozen=True, slots=True)
class Child:
    """A finished part of a delivery's work: a guest run, the transaction, the publish."""

    name: str
    start_ns: int
    end_ns: int
    attributes: Attributes = field(default_factory=dict)


@dataclass(slots=True)
class BatchCounts:
    """What one batch did, counted by label values, for the metrics."""

    size: int = 0
    deliveries: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(tenant, kind, outcome) -> deliveries."""
    journal: dict[tuple[str, str], int] = field(default_factory=dict)
    """(tenant, entry kind) -> journal rows written."""
    failed_attempts: dict[str, int] = field(default_factory=dict)
    """tenant -> failed attempts written."""
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    """(tenant, final status) -> instances that finished."""
    throttled: dict[str, int] = field(default_factory=dict)
    """tenant -> deliveries parked by the tenant's quotas."""
    fuel: list[int] = field(default_factory=list)
    """Fuel each guest run used."""
    local_steps: int = 0
    """Next steps the worker took on itself instead of publishing them."""


class Observer:
    """The instruments a worker feeds; this one records nothing (metrics and traces off)."""

    counting: bool = False
    """Whether `batch` counts anything (when False the worker does not count for it)."""
    tracing: bool = False
    """Whether `open_span` makes spans (when False the cycle asks for none)."""

    def tenant(self, tenant: str) -> str:
        """The `tenant` label value for `tenant` (bounded: see metrics.py)."""
        return "other"

    def phase(self, phase: str, seconds: float) -> None:
        """One batch spent `seconds` in `phase` (one of PHASES)."""

    def batch(self, counts: BatchCounts) -> None:
        """One batch is done (committed, published and acked)."""

    def call(self, tenant: str, seconds: float) -> None:
        """A guest's HTTP call was answered after `seconds`."""

    def modules(self, hits: int, misses: int) -> None:
        """A batch found `hits` of its modules loaded, and had to load `misses`."""

    def module_loaded(self, seconds: float) -> None:
        """A missed module took `seconds` to compile (or read from disk) and load."""

    def archived(self, reasons: Mapping[tuple[str, str], int]) -> None:
        """Dead letters stored in the archive: (tenant, reason) -> letters."""

    def timers_fired(self, lateness_seconds: Sequence[float]) -> None:
        """The timer loop sent wakes for timers this late past their due time."""

    def backlog(self, *, timers_due: int, outbox_waiting: int) -> None:
        """What waits in PostgreSQL now: due timers not yet woken, outbox rows not deleted."""

    def open_span(
        self,
        parent: str | None,
        link: str | None,
        start_ns: int,
        attributes: Attributes,
    ) -> Span | None:
        """Start a delivery span under `parent` (a traceparent; None starts a trace), linked
        to `link`; None when not tracing."""
        return None

    def close_span(
        self, span: Span, end_ns: int, attributes: Attributes, children: Sequence[Child]
    ) -> None:
        """End a delivery span, with its finished parts as children."""

    def close(self) -> None:
        """Stop serving and flush (the worker is stopping)."""


NO_OBSERVER: Final = Observer()
