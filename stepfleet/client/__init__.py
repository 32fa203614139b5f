"""The producer API: create instances and send events over RabbitMQ."""

from __future__ import annotations

from stepfleet.client.producer import (
    CreateRequest,
    EventRequest,
    Producer,
    create_message,
    event_message,
)

__all__ = ["CreateRequest", "EventRequest", "Producer", "create_message", "event_message"]
