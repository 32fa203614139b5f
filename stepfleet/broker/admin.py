"""Broker users for tenants, through the RabbitMQ management HTTP API.

A tenant's producer user may only publish, only to the ingress exchange, and only with
routing keys that start with its tenant name (topic permissions); it reads and configures
nothing. RabbitMQ then rejects any message whose `user_id` property is not that user, and
workers map the user back to the tenant.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from stepfleet.broker.errors import BrokerError, BrokerUnavailable
from stepfleet.broker.topology import Topology


@dataclass(frozen=True, slots=True)
class ProducerCredentials:
    """What a tenant's producers connect with."""

    user: str
    password: str
    vhost: str


class BrokerAdmin:
    """A client of the management API at `url` (e.g. http://guest:guest@127.0.0.1:15672)."""

    def __init__(self, url: str, topology: Topology, *, vhost: str = "/") -> None:
        parsed = urllib.parse.urlsplit(url)
        self._base = f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 15672}"
        user = urllib.parse.unquote(parsed.username or "guest")
        password = urllib.parse.unquote(parsed.password or "guest")
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._topology = topology
        self._vhost = vhost

    async def add_producer(self, tenant: str) -> ProducerCredentials:
        """Create (or reset the password of) the tenant's producer user with its permissions."""
        return await asyncio.to_thread(self._add_producer, tenant)

    async def delete_producer(self, user: str) -> None:
        """Remove a producer user; its open connections are closed by RabbitMQ."""
        await asyncio.to_thread(self._request, "DELETE", f"/api/users/{_q(user)}", None, (404,))

    def _add_producer(self, tenant: str) -> ProducerCredentials:
        user = producer_user(self._topology, tenant)
        password = secrets.token_urlsafe(24)
        vhost = _q(self._vhost)
        self._request("PUT", f"/api/users/{_q(user)}", {"password": password, "tags": ""})
        ingress = re.escape(self._topology.ingress_exchange)
        self._request(
            "PUT",
            f"/api/permissions/{vhost}/{_q(user)}",
            {"configure": "^$", "write": f"^{ingress}$", "read": "^$"},
        )
        self._request(
            "PUT",
            f"/api/topic-permissions/{vhost}/{_q(user)}",
            {
                "exchange": self._topology.ingress_exchange,
                "write": f"^{re.escape(tenant)}\\.",
                "read": "^$",
            },
        )
        return ProducerCredentials(user, password, self._vhost)

    def _request(
        self, method: str, path: str, body: object, ok_statuses: tuple[int, ...] = ()
    ) -> None:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (an operator-configured http URL)
            self._base + path,
            data=data,
            method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10):  # noqa: S310
                return
        except urllib.error.HTTPError as exc:
            if exc.code in ok_statuses:
                return
            detail = exc.read().decode(errors="replace")[:300]
            raise BrokerError(
                f"management API {method} {path} answered {exc.code}: {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot reach the RabbitMQ management API at {self._base}: {exc} "
                "(is the rabbitmq_management plugin enabled?)"
            ) from None


def producer_user(topology: Topology, tenant: str) -> str:
    """The broker user name of a tenant's producers: `<prefix>.tenant.<tenant>`."""
    return f"{topology.prefix}.tenant.{tenant}"


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
