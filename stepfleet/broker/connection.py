"""Broker: one robust connection, a consuming channel and a confirming publisher channel.

A cluster's several addresses are handled in cluster.py, consuming and fetching in
consuming.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError

from stepfleet.broker.cluster import RotatingConnection, broker_urls, censored, connect_any, login
from stepfleet.broker.consuming import consume_queue, fetch_waiting
from stepfleet.broker.errors import BrokerUnavailable, PublishRefused
from stepfleet.broker.messages import Delivery, Outgoing
from stepfleet.broker.topology import Topology

log = structlog.get_logger("stepfleet.broker")

# How long a publish waits for the publishing channel to come back after a reconnect.
_REOPEN_WAIT_SECONDS = 15.0
_CONFIRM_WAIT_SECONDS = 30.0


class Broker:
    """Connects to RabbitMQ, declares the topology, publishes with confirms and consumes."""

    def __init__(self, url: str, topology: Topology) -> None:
        self.url = url
        self.urls = broker_urls(url)
        """Several addresses (comma-separated): nodes of one cluster, tried in turn."""
        self.user = login(self.urls[0])[0]
        """The user every address logs in as; the user_id of every message that names none."""
        self.topology = topology
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consume_channel: AbstractChannel | None = None
        self._bind_channel: AbstractChannel | None = None

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
            return censored(connection.current_url)
        return censored(self.url)

    def _on_reconnect(self, _connection: AbstractRobustConnection | None, /) -> None:
        log.info("broker_reconnected", address=self.address)

    async def close(self) -> None:
        """Close channels and the connection."""
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._bind_channel = None
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
            placement = await channel.declare_exchange(
                topo.placement_exchange,
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                arguments=topo.placement_exchange_arguments(),
            )
            sources = {topo.ingress_exchange: ingress, topo.internal_exchange: internal}
            for source, key in topo.lane_bindings():
                await lanes.bind(sources[source], key)
            # Creates, steps and wakes pass the placement exchange on their way to the lanes;
            # earlier releases bound them to the lanes directly. Bind the new path before
            # the old one goes, so a message published meanwhile takes one path or both (a
            # duplicate, like any redelivery), never none.
            for source, key in topo.placement_bindings():
                await placement.bind(sources[source], key)
                await lanes.unbind(sources[source], key)
            for name in topo.work_queues:
                work = await channel.declare_queue(
                    name, durable=True, arguments=topo.work_queue_arguments()
                )
                await work.bind(lanes, "1")  # equal weights
            side = await channel.declare_exchange(
                topo.side_exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            for index, name in enumerate(topo.side_queues):
                side_queue = await channel.declare_queue(
                    name, durable=True, arguments=topo.work_queue_arguments()
                )
                await side_queue.bind(side, str(index))
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
        for queue in (*topo.work_queues, *topo.side_queues, topo.dead_letter_queue):
            await channel.queue_delete(queue)
        exchanges = (
            topo.ingress_exchange,
            topo.internal_exchange,
            topo.lanes_exchange,
            topo.placement_exchange,
            topo.side_exchange,
            topo.dead_letter_exchange,
        )
        for exchange in exchanges:
            await channel.exchange_delete(exchange)

    async def open_placement(self) -> None:
        """Open the channel placement bindings use now, ahead of the first: opened while a
        flood arrives, it took 60-200 ms, during which the flood went on into a shared lane."""
        await self._binding_channel()

    async def place_aside(self, tenant: str, side_lane: int) -> None:
        """Route the tenant's creates, steps and wakes to a side lane (idempotent)."""
        await self._placement_binding(tenant, side_lane, bound=True)

    async def place_in_lanes(self, tenant: str, side_lane: int) -> None:
        """Undo place_aside: the tenant's messages go to the lanes again (idempotent)."""
        await self._placement_binding(tenant, side_lane, bound=False)

    async def _placement_binding(self, tenant: str, side_lane: int, *, bound: bool) -> None:
        topo = self.topology
        channel = await self._binding_channel()
        change = channel.queue_bind if bound else channel.queue_unbind
        try:
            await change(
                topo.side_queues[side_lane], topo.placement_exchange, topo.aside_key(tenant)
            )
        except (*CONNECTION_EXCEPTIONS, aiormq.exceptions.AMQPError) as exc:
            where = "aside" if bound else "in the lanes"
            raise BrokerUnavailable(f"placing {tenant} {where} failed: {exc!r}") from exc

    async def _binding_channel(self) -> aiormq.abc.AbstractChannel:
        """A channel of its own for placement bindings: a refused bind closes only it. The
        underlying channel, so the robust connection does not repeat a binding after a
        reconnect that was undone since."""
        if self._connection is None:
            raise BrokerUnavailable("the broker is not connected")
        try:
            if self._bind_channel is None or self._bind_channel.is_closed:
                self._bind_channel = await self._connection.channel(publisher_confirms=False)
            return await self._bind_channel.get_underlay_channel()
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"no channel for bindings: {exc!r}") from exc

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
        channel, stop = await consume_queue(
            self._connection, queue_name, handler, prefetch=prefetch
        )
        self._consume_channel = channel
        return stop

    async def fetch(self, queue_name: str, *, limit: int) -> list[Delivery]:
        """Take up to `limit` waiting messages with basic.get; ack each to remove it."""
        return await fetch_waiting(self._channel(), queue_name, limit=limit)

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in each lane and in the dead-letter queue (passive declares, on a
        channel of their own: a queue that does not exist is left out)."""
        if self._connection is None:
            raise BrokerUnavailable("the broker is not connected")
        names = [*self.topology.work_queues, self.topology.dead_letter_queue]
        depths: dict[str, int] = {}
        try:
            channel = await self._connection.channel(publisher_confirms=False)
            for name in names:
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    channel = await self._connection.channel(publisher_confirms=False)
                    continue
                depths[name] = int(queue.declaration_result.message_count or 0)
            await channel.close()
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"cannot read queue depths: {exc!r}") from exc
        return depths
