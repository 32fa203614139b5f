"""Stable codes for why a message was dead-lettered (see docs/protocol.md)."""

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
