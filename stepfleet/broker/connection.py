"""Broker: one robust connection, a consuming channel and a confirming publisher channel."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    DeliveryError,
    MessageProcessError,
    PublishError,
)
from aio_pika.robust_connection import RobustConnection

from stepfleet.broker.errors import BrokerUnavailable, PublishRefused
from stepfleet.broker.messages import Delivery, Outgoing
from stepfleet.broker.topology import Topology
from stepfleet.broker.wire import tolerate_invalid_utf8

tolerate_invalid_utf8()  # before any connection reads a frame

log = structlog.get_logger("stepfleet.broker")

# How long a publish waits for the publishing channel to come back after a reconnect.
_REOPEN_WAIT_SECONDS = 15.0
_CONFIRM_WAIT_SECONDS = 30.0

# A comma starts another address only where a URL begins, so commas inside a password or a
# query string stay where they are.
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)


def broker_urls(url: str) -> list[str]:
    """The addresses in STEPFLEET_AMQP_URL: one URL, or several nodes of one cluster separated
    by commas (`amqp://u:p@n1:5672/,amqp://u:p@n2:5672/`).

    One address is returned exactly as given. Several must all log in as the same user to the
    same virtual host: the fleet's own user and a producer's `user_id` are read from the first.

    Raises:
        ValueError: addresses with different users or virtual hosts.
    """
    parts = (part.strip().rstrip(",").strip() for part in _URL_SEPARATOR.split(url.strip()))
    urls = [part for part in parts if part]
    if len(urls) <= 1:
        return [url]
    logins = {_login(u) for u in urls}
    if len(logins) > 1:
        raise ValueError(
            "every RabbitMQ URL must name the same user and virtual host, got "
            + ", ".join(f"{user}@{vhost!r}" for user, vhost in sorted(logins))
        )
    return urls


def _login(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return unquote(parts.username or "guest"), vhost


def _censored(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:******@{host}").geturl()


class RotatingConnection(RobustConnection):
    """A robust connection to one of several nodes of a cluster.

    aio-pika's RobustConnection reconnects to its one URL. Every time a connection is lost, or
    an attempt to open one fails, it calls `_on_connection_close` before it tries again (a
    failed attempt too, with the attempt's error), and the next attempt connects to `self.url`.
    So rotating `self.url` there sends each attempt to the next address: a connection to a node
    that went away moves to another node at once, and while nodes stay down the attempts go
    round the list every `reconnect_interval` (5 s, `?reconnect_interval=` in the URLs).
    The robust channels then restore the topology and the consumers on the node it reached.
    """

    def __init__(self, urls: Sequence[str], first: int = 0, **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no RabbitMQ URL given")
        self.urls = tuple(urls)
        self.index = first % len(self.urls)
        super().__init__(aio_pika.connection.make_url(self.urls[self.index]), **kwargs)

    @property
    def current_url(self) -> str:
        """The address the current (or next) connection attempt uses."""
        return self.urls[self.index]

    def rotate(self) -> None:
        """Point the next connection attempt at the next address."""
        self.index = (self.index + 1) % len(self.urls)
        self.url = aio_pika.connection.make_url(self.urls[self.index])

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self.close_called and not self.is_closed and len(self.urls) > 1:
            lost = self.current_url
            self.rotate()
            if self.connection_attempt:  # connect_any reports the first attempts itself
                log.warning(
                    "broker_connection_lost",
                    address=_censored(lost),
                    next_address=_censored(self.current_url),
                )
        await super()._on_connection_close(closing)


async def connect_any(urls: Sequence[str], **kwargs: Any) -> RotatingConnection:
    """Open a RotatingConnection to the first of `urls` that answers.

    Raises:
        The last address's connection error when none answers.
    """
    failure: BaseException | None = None
    for first in range(len(urls)):
        connection = RotatingConnection(urls, first, **kwargs)
        try:
            await connection.connect()
        except CONNECTION_EXCEPTIONS as exc:
            failure = exc
            log.warning("broker_unreachable", address=_censored(urls[first]), error=repr(exc))
            await connection.close()
            continue
        return connection
    if failure is None:
        raise ValueError("no RabbitMQ URL given")
    raise failure


def _delivery(message: AbstractIncomingMessage) -> Delivery:
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


class Broker:
    """Connects to RabbitMQ, declares the topology, publishes with confirms and consumes."""

    def __init__(self, url: str, topology: Topology) -> None:
        self.url = url
        self.urls = broker_urls(url)
        """Several addresses (comma-separated): nodes of one cluster, tried in turn."""
        self.user = _login(self.urls[0])[0]
        """The user every address logs in as; the user_id of every message that names none."""
        self.topology = topology
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consume_channel: AbstractChannel | None = None

    async def connect(self, *, name: str = "stepfleet") -> None:
        """Open the connection and the publishing channel."""
        try:
            if len(self.urls) > 1:
                self._connection = await connect_any(
                    self.urls, client_properties={"connection_name": name}
                )
            else:
                self._connection = await aio_pika.connect_robust(
                    self.url, client_properties={"connection_name": name}
                )
            self._connection.reconnect_callbacks.add(self._on_reconnect)
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc

    @property
    def address(self) -> str | None:
        """The address (password hidden) of the node the connection uses; None: not connected."""
        connection = self._connection
        if connection is None:
            return None
        if isinstance(connection, RotatingConnection):
            return _censored(connection.current_url)
        return _censored(self.url)

    def _on_reconnect(self, _connection: AbstractRobustConnection | None, /) -> None:
        log.info("broker_reconnected", address=self.address)

    async def close(self) -> None:
        """Close channels and the connection."""
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._exchanges.clear()

    @property
    def connected(self) -> bool:
        """Whether the connection to RabbitMQ is open right now."""
        return self._connection is not None and not self._connection.is_closed

    async def __aenter__(self) -> Broker:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _channel(self) -> AbstractChannel:
        if self._publish_channel is None:
            raise BrokerUnavailable("the broker is not connected")
        return self._publish_channel

    async def declare(self) -> None:
        """Declare every exchange, queue and binding; safe to repeat."""
        channel = self._channel()
        topo = self.topology
        try:
            ingress = await channel.declare_exchange(
                topo.ingress_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            internal = await channel.declare_exchange(
                topo.internal_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            dead = await channel.declare_exchange(
                topo.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
            )
            lanes = await channel.declare_exchange(
                topo.lanes_exchange,
                "x-consistent-hash",
                durable=True,
                arguments=topo.lanes_exchange_arguments(),
            )
            # Placement by a producer-set header is gone for good: drop the old exchange (and
            # its bindings) before the new one is bound, so no message takes both paths.
            await channel.exchange_delete(topo.legacy_lanes_exchange)
            sources = {topo.ingress_exchange: ingress, topo.internal_exchange: internal}
            for source, key in topo.lane_bindings():
                await lanes.bind(sources[source], key)
            for name in topo.work_queues:
                work = await channel.declare_queue(
                    name, durable=True, arguments=topo.work_queue_arguments()
                )
                await work.bind(lanes, "1")  # equal weights
            dead_queue = await channel.declare_queue(
                topo.dead_letter_queue, durable=True, arguments=topo.dead_letter_queue_arguments()
            )
            await dead_queue.bind(dead, "")
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"declaring the topology failed: {exc!r}") from exc
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerUnavailable(
                f"a queue or exchange exists with other arguments: {exc}"
            ) from exc

    async def delete_topology(self) -> None:
        """Delete every queue and exchange of this prefix (tests and teardown only)."""
        channel = self._channel()
        topo = self.topology
        for queue in (*topo.work_queues, topo.dead_letter_queue):
            await channel.queue_delete(queue)
        exchanges = (
            topo.ingress_exchange,
            topo.internal_exchange,
            topo.lanes_exchange,
            topo.dead_letter_exchange,
        )
        for exchange in exchanges:
            await channel.exchange_delete(exchange)

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel().get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def _publishing_ready(self) -> None:
        """Wait, for a while, until a reconnect has restored the publishing channel.

        After a reconnect the robust connection restores its channels one after another, so a
        consumer channel may already deliver while this one is still closed. Failing such a
        publish would leave those deliveries unacked on a live channel (nothing redelivers
        them and the lane's prefetch stays full), so wait for the channel instead.
        """
        channel = self._channel()
        connection = self._connection
        if not channel.is_closed or not isinstance(channel, AbstractRobustChannel):
            return
        if connection is None or connection.is_closed:
            raise BrokerUnavailable("the broker connection is closed")
        try:
            await asyncio.wait_for(channel.ready(), _REOPEN_WAIT_SECONDS)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"the publishing channel did not come back within {_REOPEN_WAIT_SECONDS:.0f}s"
            ) from exc

    async def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """Publish persistent messages and wait for all their confirms at once.

        A message that names no user_id carries the connection's own user: RabbitMQ checks
        it, so whoever reads the message later knows the fleet published it (the dead-letter
        archive tells a worker's dead letters from producers' messages that way).

        Raises:
            BrokerUnavailable: the connection failed before every confirm arrived.
            PublishRefused: the broker refused at least one message.
        """
        if not messages:
            return
        await self._publishing_ready()
        try:
            pending = []
            for outgoing in messages:
                exchange = await self._exchange(outgoing.exchange)
                message = aio_pika.Message(
                    outgoing.body,
                    headers=dict(outgoing.headers),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=outgoing.message_id,
                    user_id=outgoing.user_id or self.user,
                )
                pending.append(
                    exchange.publish(
                        message,
                        outgoing.routing_key,
                        mandatory=True,
                        timeout=_CONFIRM_WAIT_SECONDS,
                    )
                )
            await asyncio.gather(*pending)
        except (DeliveryError, PublishError) as exc:
            raise PublishRefused(f"RabbitMQ refused a message: {exc!r}") from exc
        except TimeoutError as exc:
            # A confirm lost in a node's failover would hold the caller, and the deliveries it
            # has not acked, for good; the outbox keeps what was not confirmed.
            raise BrokerUnavailable(
                f"no publisher confirm within {_CONFIRM_WAIT_SECONDS:.0f}s"
            ) from exc
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"publishing failed: {exc!r}") from exc

    async def consume(
        self,
        queue_name: str,
        handler: Callable[[Delivery], Awaitable[None]],
        *,
        prefetch: int,
    ) -> Callable[[], Awaitable[None]]:
        """Start consuming with manual acks and a bounded prefetch; return a stop function."""
        if self._connection is None:
            raise BrokerUnavailable("the broker is not connected")
        try:
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            # A (passive) declare registers the queue with the robust channel, which then
            # consumes again after a reconnect; get_queue(ensure=False) would not.
            queue = await channel.declare_queue(queue_name, passive=True)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await handler(_delivery(message))

            tag = await queue.consume(on_message, no_ack=False)
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"cannot consume {queue_name}: {exc!r}") from exc
        self._consume_channel = channel

        async def stop() -> None:
            try:
                await queue.cancel(tag)
            except CONNECTION_EXCEPTIONS:
                log.warning("cancel_failed", queue=queue_name)

        return stop

    async def fetch(self, queue_name: str, *, limit: int) -> list[Delivery]:
        """Take up to `limit` waiting messages with basic.get; ack each to remove it."""
        try:
            queue = await self._channel().get_queue(queue_name, ensure=False)
            taken: list[Delivery] = []
            while len(taken) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                taken.append(_delivery(message))
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"cannot read {queue_name}: {exc!r}") from exc
        return taken
