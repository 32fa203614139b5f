"""RabbitMQ through aio-pika: topology, confirmed publishing, consuming, dead-lettering."""

from __future__ import annotations

from stepfleet.broker.connection import Broker
from stepfleet.broker.errors import BrokerError, BrokerUnavailable, PublishRefused
from stepfleet.broker.messages import Delivery, Outgoing
from stepfleet.broker.topology import Topology

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Delivery",
    "Outgoing",
    "PublishRefused",
    "Topology",
]
