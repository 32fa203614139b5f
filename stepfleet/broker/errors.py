"""Errors of the broker room."""

from __future__ import annotations


class BrokerError(Exception):
    """Root of the broker's errors."""

    retryable = False


class BrokerUnavailable(BrokerError):
    """RabbitMQ could not be reached or dropped the connection; try again later."""

    retryable = True


class PublishRefused(BrokerError):
    """RabbitMQ refused a message (nack, or unroutable with mandatory set)."""
