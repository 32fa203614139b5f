"""Errors of the sandbox room."""

from __future__ import annotations


class SandboxError(Exception):
    """Root of the sandbox's errors."""


class InvalidModule(SandboxError):
    """The bytes are not a module stepfleet can run; the message says what is wrong."""
