"""The sandbox interface the worker depends on."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from stepfleet.sandbox.compiler import ModuleCompiler
from stepfleet.schemas import AnsweredCall, GuestReport


@dataclass(frozen=True, slots=True)
class GuestRun:
    """One run to perform: the module to run and the replay buffer to hand it."""

    digest: str
    replay_buffer: bytes
    journal_length: int = 0
    """Entries in the buffer: the position the run's first new entry takes."""
    attempt: int = 1
    fuel_per_run: int | None = None
    """The tenant's CPU budget, when it differs from the sandbox's."""
    memory_bytes: int | None = None
    """The tenant's memory cap, when it differs from the sandbox's."""
    tenant: str = ""
    """Whose instance runs (named in the sandbox's own log lines)."""
    instance: str = ""
    """The instance that runs (named in a guest process's log lines)."""
    host_calls_per_step: int | None = None
    """HTTP calls one step may make; None: SandboxLimits.host_calls_per_step."""
    answers: tuple[AnsweredCall, ...] = ()
    """A resumed attempt: the answers of its step's HTTP calls so far, in order. The run hands
    them to the guest's calls instead of stopping at them (`CallRequested`)."""
    step_deadline: float | None = None
    """A resumed attempt: when its step's timeout runs out (`time.monotonic()` seconds), kept
    from the run that began the step."""


class Sandbox(Protocol):
    """Runs guests; not thread-safe, so one thread per process drives it (but `compiler`)."""

    compiler: ModuleCompiler
    """Compiles modules in a child process under the compile limits; thread-safe, and
    `compiler.submit` compiles on threads of its own, not the one that runs guests."""

    def validate(self, wasm: bytes) -> None:
        """Check that `wasm` is a module the ABI can run; raise InvalidModule if not."""

    def is_loaded(self, digest: str) -> bool:
        """Tell whether the module is compiled and cached."""

    def load(self, digest: str, wasm: bytes, artifact: bytes | None = None) -> None:
        """Compile and cache a module whose bytes hash to `digest`; given the `artifact`
        `compiler.submit` made for it, only deserialize that."""

    def run(self, job: GuestRun) -> GuestReport:
        """Run one guest to its outcome (or to an HTTP call it must wait for:
        `CallRequested`), with the values it recorded and its log lines."""


class LongRuns(Protocol):
    """Runs guests that need more than a short slice away from the process that drives the
    sandbox (`guest_pool.GuestProcessPool`), so their CPU does not hold its other runs."""

    def submit(self, job: GuestRun) -> Future[GuestReport]:
        """Queue `job` behind its tenant's earlier long runs, its tenant taking turns with the
        others; the future's result is its report (a crashed run if its process died).
        Call it on the thread that drives the sandbox, once `job.digest` is loaded."""

    def close(self) -> None:
        """Stop the processes; queued runs are cancelled."""
