"""The sandbox interface the worker depends on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stepfleet.sandbox.compiler import ModuleCompiler
from stepfleet.schemas import GuestReport, HttpRequest, HttpResponse


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
    """The tenant the instance belongs to: whose egress allow list and secrets apply."""
    host_calls_per_step: int | None = None
    """HTTP calls one step may make; None: SandboxLimits.host_calls_per_step."""


class Egress(Protocol):
    """The egress gateway the sandbox hands guests' HTTP calls to; it does the network I/O.

    `request` never raises for anything the guest or the network did: refusals, timeouts and
    connection failures come back as `HttpResponse.failed(message)`, and the answer must hold
    nothing the guest may not read (the gateway scrubs the secrets it injects).
    """

    @property
    def call_timeout_s(self) -> float:
        """The longest one call may take; the sandbox passes min(this, the step's time left)."""

    def request(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Perform one call for `tenant` within `timeout_s` seconds, wall clock."""


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
        """Run one guest to its outcome, with the values it recorded and its log lines."""
