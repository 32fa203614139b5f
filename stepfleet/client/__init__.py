"""The producer API: create instances and send events over RabbitMQ."""

from __future__ import annotations

from stepfleet.client.producer import CreateRequest, Producer, create_message

__all__ = ["CreateRequest", "Producer", "create_message"]
