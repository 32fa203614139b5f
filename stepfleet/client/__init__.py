"""The producer API: create instances and send events over RabbitMQ."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
    from stepfleet.client.producer import (
        CreateRequest,
        EventRequest,
        Producer,
        create_message,
        event_message,
    )

__all__ = ["CreateRequest", "EventRequest", "Producer", "create_message", "event_message"]

__getattr__ = lazy_exports(
    __name__,
    {
        "CreateRequest": "stepfleet.client.producer",
        "EventRequest": "stepfleet.client.producer",
        "Producer": "stepfleet.client.producer",
        "create_message": "stepfleet.client.producer",
        "event_message": "stepfleet.client.producer",
    },
)
