"""Stable codes for why a message was dead-lettered (see docs/protocol.md) and why the engine
errored an instance."""

from __future__ import annotations

from enum import StrEnum


class DeadReason(StrEnum):
    """The `x-dead-reason` a worker gives a dead letter; the values are part of the protocol.

    RabbitMQ's own reasons (`expired`, `delivery-limit`, ...) come from `x-death` and are
    not listed here: stepfleet never sends them.
    """

    MISSING_HEADER = "missing-header"
    BAD_HEADER = "bad-header"
    UNSUPPORTED_VERSION = "unsupported-version"
    TOO_LARGE = "too-large"
    BAD_BODY = "bad-body"
    UNKNOWN_MODULE = "unknown-module"
    UNKNOWN_INSTANCE = "unknown-instance"
    MODULE_MISMATCH = "module-mismatch"
    POSITION_AHEAD = "position-ahead"
    UNVERIFIED_PRODUCER = "unverified-producer"
    TENANT_MISMATCH = "tenant-mismatch"
    KIND_NOT_ALLOWED = "kind-not-allowed"
    INSTANCE_FINISHED = "instance-finished"
    OVER_LIMIT = "over-limit"
    UNPROCESSABLE = "unprocessable"


class ErrorKind(StrEnum):
    """Why the engine errored an instance (or began its compensations); its error text says
    the rest, for people."""

    NONDETERMINISM = "nondeterminism"
    """The workflow asked for something other than its journal holds."""
    ABI_VIOLATION = "abi-violation"
    """The guest reported something the ABI does not allow."""
    LIMIT = "limit"
    """The instance went past an engine limit: journal entries, state bytes, sleep length."""
    CRASHED = "crashed"
    """The guest run ended without an outcome (a trap or a breached sandbox limit)."""
    WORKFLOW_FAILED = "workflow-failed"
    """The workflow gave up."""
    COMPENSATION_FAILED = "compensation-failed"
    """A compensation step failed past its retries."""
