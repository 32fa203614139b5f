"""Taking messages off queues: consumers with manual acks, basic.get, and the Delivery each
message becomes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, MessageProcessError

from stepfleet.broker.errors import BrokerUnavailable
from stepfleet.broker.messages import Delivery

__all__ = ["consume_queue", "delivery_of", "fetch_waiting"]

log = structlog.get_logger("stepfleet.broker")


def delivery_of(message: AbstractIncomingMessage) -> Delivery:
    headers: dict[str, Any] = dict(message.headers or {})
    count = headers.get("x-delivery-count")

    async def ack() -> None:
        try:
            await message.ack()
        except CONNECTION_EXCEPTIONS as exc:
            # The broker will redeliver it; the journal position makes that harmless.
            raise BrokerUnavailable(f"ack failed: {exc!r}") from exc

    async def release() -> None:
        try:
            await message.nack(requeue=True)
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"release failed: {exc!r}") from exc
        except MessageProcessError:
            pass  # already acked or released: nothing left to hand back

    return Delivery(
        body=message.body,
        headers=headers,
        routing_key=message.routing_key or "",
        exchange=message.exchange or "",
        message_id=message.message_id,
        user_id=message.user_id,
        redelivered=bool(message.redelivered),
        delivery_count=count if isinstance(count, int) else 0,
        _ack=ack,
        _release=release,
    )


async def consume_queue(
    connection: AbstractRobustConnection,
    queue_name: str,
    handler: Callable[[Delivery], Awaitable[None]],
    *,
    prefetch: int,
) -> tuple[AbstractChannel, Callable[[], Awaitable[None]]]:
    """Consume on a channel of its own; return the channel and a stop function."""
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        # A (passive) declare registers the queue with the robust channel, which then
        # consumes again after a reconnect; get_queue(ensure=False) would not.
        queue = await channel.declare_queue(queue_name, passive=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await handler(delivery_of(message))

        tag = await queue.consume(on_message, no_ack=False)
    except CONNECTION_EXCEPTIONS as exc:
        raise BrokerUnavailable(f"cannot consume {queue_name}: {exc!r}") from exc

    async def stop() -> None:
        try:
            await queue.cancel(tag)
        except CONNECTION_EXCEPTIONS:
            log.warning("cancel_failed", queue=queue_name)

    return channel, stop


async def fetch_waiting(channel: AbstractChannel, queue_name: str, *, limit: int) -> list[Delivery]:
    """Take up to `limit` waiting messages with basic.get."""
    try:
        queue = await channel.get_queue(queue_name, ensure=False)
        taken: list[Delivery] = []
        while len(taken) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append(delivery_of(message))
    except CONNECTION_EXCEPTIONS as exc:
        raise BrokerUnavailable(f"cannot read {queue_name}: {exc!r}") from exc
    return taken
