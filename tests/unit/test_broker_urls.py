"""Several broker addresses in STEPFLEET_AMQP_URL (parsing, rotation) and publishing across a
reconnect, without a broker."""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import pytest
from aio_pika.abc import AbstractRobustChannel

from stepfleet.broker import BrokerUnavailable, Outgoing, Topology
from stepfleet.broker import connection as broker_connection
from stepfleet.broker.cluster import RotatingConnection, broker_urls, connect_any
from stepfleet.broker.connection import Broker

N1 = "amqp://fleet:pw@n1:5672/"
N2 = "amqp://fleet:pw@n2:5672/"
N3 = "amqp://fleet:pw@n3:5673/"


def _refused_port() -> int:
    """A local port nothing listens on (bound for a moment, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_one_url_is_kept_as_it_is() -> None:
    assert broker_urls("amqp://guest:guest@127.0.0.1:5672/") == [
        "amqp://guest:guest@127.0.0.1:5672/"
    ]
    # Not even a URL, or nothing: left to aio-pika, as before.
    assert broker_urls("localhost") == ["localhost"]
    assert broker_urls("") == [""]
    assert broker_urls("amqp://guest:guest@h/,") == ["amqp://guest:guest@h/,"]


def test_several_urls_are_split_on_commas() -> None:
    assert broker_urls(f"{N1},{N2},{N3}") == [N1, N2, N3]
    assert broker_urls(f" {N1} , {N2} ,") == [N1, N2]
    assert broker_urls(f"{N1},AMQPS://fleet:pw@n2:5671/") == [N1, "AMQPS://fleet:pw@n2:5671/"]


def test_commas_inside_a_url_do_not_split_it() -> None:
    first = "amqp://fleet:p,w@n1:5672/?name=a,b"
    second = "amqp://fleet:p,w@n2:5672/"
    assert broker_urls(f"{first},{second}") == [first, second]


def test_the_addresses_must_share_user_and_vhost() -> None:
    with pytest.raises(ValueError, match="same user and virtual host"):
        broker_urls("amqp://a:pw@n1/,amqp://b:pw@n2/")
    with pytest.raises(ValueError, match="same user and virtual host"):
        broker_urls("amqp://a:pw@n1/one,amqp://a:pw@n2/two")
    # "/" and no path both mean the default virtual host.
    assert len(broker_urls("amqp://a:pw@n1,amqp://a:pw@n2/")) == 2


def test_broker_keeps_the_setting_and_lists_the_addresses() -> None:
    broker = Broker(f"{N1},{N2}", Topology())
    assert broker.url == f"{N1},{N2}"
    assert broker.urls == [N1, N2]
    assert broker.address is None  # not connected
    assert Broker(N1, Topology()).urls == [N1]


async def test_rotation_goes_round_the_list() -> None:
    connection = RotatingConnection([N1, N2, N3], first=1)
    assert connection.current_url == N2
    assert connection.url.host == "n2"
    for host in ("n3", "n1", "n2"):
        connection.rotate()
        assert connection.url.host == host
    assert connection.url.port == 5672
    await connection.close()


async def test_a_lost_connection_points_the_next_attempt_at_the_next_node() -> None:
    connection = RotatingConnection([N1, N2, N3])
    lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    lost.set_exception(ConnectionError("node n1 stopped"))
    await connection._on_connection_close(lost)
    assert connection.url.host == "n2"
    # Closing on purpose is not a loss: the address stays.
    await connection.close()
    await connection._on_connection_close(lost)
    assert connection.url.host == "n2"


async def test_one_address_never_rotates() -> None:
    connection = RotatingConnection([N1])
    lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    lost.set_exception(ConnectionError("gone"))
    await connection._on_connection_close(lost)
    assert connection.url.host == "n1"
    await connection.close()


async def test_a_failed_attempt_moves_on_to_the_next_address() -> None:
    """aio-pika reports a failed attempt through _on_connection_close too: the hook rotates."""
    down = [f"amqp://guest:guest@127.0.0.1:{_refused_port()}/" for _ in range(2)]
    connection = RotatingConnection(down)
    with pytest.raises(ConnectionError):
        await connection.connect(timeout=5)
    assert connection.current_url == down[1]
    await connection.close()


async def test_connect_any_tries_every_address_then_raises() -> None:
    down = [f"amqp://guest:guest@127.0.0.1:{_refused_port()}/" for _ in range(3)]
    with pytest.raises(ConnectionError):
        await connect_any(down)


async def test_broker_reports_no_node_answering_as_unavailable() -> None:
    down = ",".join(f"amqp://guest:guest@127.0.0.1:{_refused_port()}/" for _ in range(2))
    with pytest.raises(BrokerUnavailable, match="cannot connect"):
        await Broker(down, Topology()).connect()


async def test_one_url_still_goes_straight_to_connect_robust(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[Any, dict[str, Any]]] = []

    async def fake_connect_robust(url: Any, **kwargs: Any) -> Any:
        seen.append((url, kwargs))
        raise ConnectionError("refused")

    monkeypatch.setattr(broker_connection.aio_pika, "connect_robust", fake_connect_robust)
    with pytest.raises(BrokerUnavailable):
        await Broker(N1, Topology()).connect(name="one")
    assert seen == [(N1, {"client_properties": {"connection_name": "one"}})]


def _broker_with(channel: Any, *, connection_closed: bool = False) -> Broker:
    broker = Broker(N1, Topology())
    broker._publish_channel = channel
    broker._connection = MagicMock(is_closed=connection_closed)
    return broker


def _reopening_channel() -> Any:
    """A robust publishing channel that is closed now (a reconnect is restoring it)."""
    channel = MagicMock(spec=AbstractRobustChannel)
    channel.is_closed = True
    exchange = MagicMock()
    exchange.publish = AsyncMock()
    channel.get_exchange = AsyncMock(return_value=exchange)
    return channel


OUT = Outgoing("stepfleet.internal", "acme.step", b"{}", {"x-tenant": "acme"})


async def test_a_publish_waits_for_the_channel_a_reconnect_is_restoring() -> None:
    """Consumer channels may be restored first: their deliveries' next messages must wait for
    the publishing channel, not fail (which would leave the deliveries unacked for good)."""
    channel = _reopening_channel()

    async def restored() -> None:
        await asyncio.sleep(0.05)
        channel.is_closed = False

    channel.ready = AsyncMock(side_effect=restored)
    await _broker_with(channel).publish_many([OUT])
    channel.ready.assert_awaited_once()
    exchange = channel.get_exchange.return_value
    exchange.publish.assert_awaited_once()


async def test_a_publish_gives_up_when_the_channel_does_not_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broker_connection, "_REOPEN_WAIT_SECONDS", 0.05)
    channel = _reopening_channel()

    async def never() -> None:
        await asyncio.sleep(10)

    channel.ready = AsyncMock(side_effect=never)
    with pytest.raises(BrokerUnavailable, match="did not come back"):
        await _broker_with(channel).publish_many([OUT])
    channel.get_exchange.return_value.publish.assert_not_awaited()


async def test_a_publish_after_close_fails_at_once() -> None:
    channel = _reopening_channel()
    channel.ready = AsyncMock()
    with pytest.raises(BrokerUnavailable, match="closed"):
        await _broker_with(channel, connection_closed=True).publish_many([OUT])
    channel.ready.assert_not_awaited()


async def test_an_open_channel_publishes_without_waiting() -> None:
    channel = _reopening_channel()
    channel.is_closed = False
    channel.ready = AsyncMock()
    await _broker_with(channel).publish_many([OUT])
    channel.ready.assert_not_awaited()
    channel.get_exchange.return_value.publish.assert_awaited_once()


async def test_a_message_without_user_id_carries_the_brokers_own_user() -> None:
    """RabbitMQ vouches for user_id, so every message the fleet publishes names the fleet's
    user (the dead-letter archive trusts a worker's dead letters for that); a message that
    names its user keeps it."""
    channel = _reopening_channel()
    channel.is_closed = False
    producer = Outgoing("stepfleet.ingress", "acme.create", b"{}", user_id="someone")
    await _broker_with(channel).publish_many([OUT, producer])
    published = channel.get_exchange.return_value.publish.call_args_list
    assert [call.args[0].user_id for call in published] == ["fleet", "someone"]
