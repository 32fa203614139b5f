"""RabbitMQ through aio-pika: topology, confirmed publishing, consuming, dead-lettering."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__ = lazy_exports(
    __name__,
    {
        "Broker": "stepfleet.broker.connection",
        "BrokerError": "stepfleet.broker.errors",
        "BrokerUnavailable": "stepfleet.broker.errors",
        "PublishRefused": "stepfleet.broker.errors",
        "Delivery": "stepfleet.broker.messages",
        "Outgoing": "stepfleet.broker.messages",
        "Topology": "stepfleet.broker.topology",
    },
)
