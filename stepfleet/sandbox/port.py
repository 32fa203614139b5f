"""The sandbox interface the worker depends on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stepfleet.schemas import GuestReport


@dataclass(frozen=True, slots=True)
class GuestRun:
    """One run to perform: the module to run and the replay buffer to hand it."""

    digest: str
    replay_buffer: bytes
    journal_length: int = 0
    """Entries in the buffer: the position the run's first new entry takes."""
    attempt: int = 1


class Sandbox(Protocol):
    """Runs guests; not thread-safe, so one thread per process drives it."""

    def validate(self, wasm: bytes) -> None:
        """Check that `wasm` is a module the ABI can run; raise InvalidModule if not."""

    def is_loaded(self, digest: str) -> bool:
        """Tell whether the module is compiled and cached."""

    def load(self, digest: str, wasm: bytes) -> None:
        """Compile and cache a module whose bytes hash to `digest`."""

    def run(self, job: GuestRun) -> GuestReport:
        """Run one guest to its outcome, with the values it recorded and its log lines."""
