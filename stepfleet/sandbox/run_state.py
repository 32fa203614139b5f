"""What one guest run carries while it runs: the step under way and what the guest recorded."""

from __future__ import annotations

import time

import wasmtime

from stepfleet.sandbox.linking import Violation
from stepfleet.schemas import AnsweredCall, EntryKind, Recorded, StepConfig


class Step:
    """The step the guest has begun (`step_begin`) and not yet reported."""

    __slots__ = ("config", "deadline", "http_calls", "http_response", "name", "seq")

    def __init__(
        self, seq: int, name: str, config: StepConfig, deadline: float | None = None
    ) -> None:
        self.seq = seq
        self.name = name
        self.config = config
        # When the step's timeout runs out (monotonic seconds): bounds its HTTP calls. A
        # resumed attempt keeps the deadline of the run that began it.
        self.deadline = (
            time.monotonic() + config.timeout_ms / 1000 if deadline is None else deadline
        )
        self.http_calls = 0
        # The answer of the last `http_request`, until `http_response` copies it.
        self.http_response: bytes | None = None


class RunState:
    """What the host imports of the current run read and write."""

    __slots__ = (
        "answered",
        "answers",
        "attempt",
        "host_calls_per_step",
        "logs",
        "memory",
        "next_seq",
        "recorded",
        "step",
        "step_deadline",
        "store",
    )

    def __init__(
        self,
        store: wasmtime.Store | None = None,
        next_seq: int = 0,
        attempt: int = 1,
        *,
        host_calls_per_step: int = 0,
        answers: tuple[AnsweredCall, ...] = (),
        step_deadline: float | None = None,
    ):
        self.store = store
        self.memory: wasmtime.Memory | None = None
        """The instance's exported memory, once instantiated: host imports use it instead of
        looking it up through their caller at every call."""
        self.logs: list[tuple[int, str]] = []
        self.recorded: list[Recorded] = []
        self.next_seq = next_seq
        self.attempt = attempt
        self.step: Step | None = None
        self.host_calls_per_step = host_calls_per_step
        # A resumed attempt: the answers its step's calls get, and the step's deadline.
        self.answers = answers
        self.step_deadline = step_deadline
        # The answers this run's step has had so far (handed on when it stops at a call).
        self.answered: list[AnsweredCall] = []

    def record(self, seq: int, kind: EntryKind, value: str) -> None:
        """Record a `now` or `random` value, which must take the next journal position."""
        if seq != self.next_seq:
            raise Violation(
                f"guest ABI violation: a value recorded at position {seq}, "
                f"the next position is {self.next_seq}"
            )
        self.recorded.append(Recorded(seq, kind, value))
        self.next_seq += 1
