"""Several nodes of one RabbitMQ cluster behind one STEPFLEET_AMQP_URL: the addresses, and a
robust connection that moves to the next node when it loses one."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection

from stepfleet.broker.wire import tolerate_invalid_utf8

__all__ = ["RotatingConnection", "broker_urls", "censored", "connect_any", "login"]

# Before any connection reads a frame: Broker imports this module, so its connections too.
tolerate_invalid_utf8()

log = structlog.get_logger("stepfleet.broker")

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
    logins = {login(u) for u in urls}
    if len(logins) > 1:
        raise ValueError(
            "every RabbitMQ URL must name the same user and virtual host, got "
            + ", ".join(f"{user}@{vhost!r}" for user, vhost in sorted(logins))
        )
    return urls


def login(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return unquote(parts.username or "guest"), vhost


def censored(url: str) -> str:
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
                    address=censored(lost),
                    next_address=censored(self.current_url),
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
            log.warning("broker_unreachable", address=censored(urls[first]), error=repr(exc))
            await connection.close()
            continue
        return connection
    if failure is None:
        raise ValueError("no RabbitMQ URL given")
    raise failure
