"""Messages in and out, without aio-pika types leaking to the rest of stepfleet."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A persistent JSON message to publish with confirms."""

    exchange: str
    routing_key: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    user_id: str | None = None
    """The publishing connection's user; RabbitMQ refuses the message if it is another.
    None: the broker's own user (what the fleet's messages carry)."""


@dataclass(slots=True)
class Delivery:
    """A message received from the work queue; ack it only once its effects are durable."""

    body: bytes
    headers: Mapping[str, Any]
    routing_key: str
    exchange: str
    """The exchange it was published to: ingress (producers) or internal (the fleet)."""
    message_id: str | None
    user_id: str | None
    redelivered: bool
    delivery_count: int
    _ack: Callable[[], Awaitable[None]]
    _release: Callable[[], Awaitable[None]]

    async def ack(self) -> None:
        """Acknowledge the delivery; a lost channel makes the broker redeliver instead."""
        await self._ack()

    async def release(self) -> None:
        """Hand the delivery back for redelivery (counted against the queue's delivery limit).

        Only for failures the worker cannot resolve itself; never a retry mechanism.
        """
        await self._release()
