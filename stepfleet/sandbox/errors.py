"""Errors of the sandbox room."""

from __future__ import annotations


class SandboxError(Exception):
    """Root of the sandbox's errors."""


class InvalidModule(SandboxError):
    """The bytes are not a module stepfleet can run; the message says what is wrong."""


class CompileLimitExceeded(InvalidModule):
    """Compiling the module would breach a compile limit; the message names it and its setting.

    `limit` is one of `module-size`, `functions`, `function-size`, `locals` (checked before
    compiling), `compile-time` or `compile-memory` (enforced on the compiler process). The
    same bytes under the same limits are refused again, so a worker need not retry them.
    """

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class CompileFailed(SandboxError):
    """The compiler process failed for a reason that is not the module's (it could not start,
    was killed from outside, or the host starved it past the wall-clock bound); try again."""


class GuestProcessLost(SandboxError):
    """A guest process was stopped from outside during a run: the run's outcome is unknown,
    and its message must be processed again."""
