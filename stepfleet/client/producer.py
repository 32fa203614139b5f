"""Producer: publishes create and event messages exactly as docs/protocol.md describes them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from stepfleet.broker import Broker, Outgoing, Topology
from stepfleet.broker.topology import routing_key
from stepfleet.schemas import MAX_NAME_BYTES, SCHEMA_VERSION, Headers, MessageKind


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """One instance to create; `instance_id` defaults to a fresh UUID."""

    tenant: str
    module: str
    params: Any = field(default_factory=dict)
    instance_id: str | None = None
    traceparent: str | None = None
    retention_seconds: int | None = None
    """Keep the instance this long once finished (default: the fleet's retention)."""


@dataclass(frozen=True, slots=True)
class EventRequest:
    """An event for an instance; `event_id` makes sending it idempotent (default: a UUID)."""

    tenant: str
    instance_id: str
    type: str
    payload: Any = None
    event_id: str | None = None


def create_message(
    topology: Topology, request: CreateRequest, *, user_id: str | None = None
) -> tuple[str, Outgoing]:
    """Validate a create request and build its message; return (instance id, message).

    Raises:
        ValueError: a field is malformed (the message would be dead-lettered).
    """
    instance_id = request.instance_id or str(uuid.uuid4())
    headers = Headers.table(
        MessageKind.CREATE, request.tenant, instance_id, request.module, request.traceparent
    )
    fields: dict[str, Any] = {"version": SCHEMA_VERSION, "params": request.params}
    if request.retention_seconds is not None:
        fields["retention_seconds"] = request.retention_seconds
    body = json.dumps(fields).encode()
    return instance_id, Outgoing(
        exchange=topology.ingress_exchange,
        routing_key=routing_key(request.tenant, MessageKind.CREATE),
        body=body,
        headers=headers,
        message_id=f"{request.tenant}/{instance_id}/create",
        user_id=user_id,
    )


def event_message(
    topology: Topology, request: EventRequest, *, user_id: str | None = None
) -> tuple[str, Outgoing]:
    """Validate an event and build its message; return (event id, message).

    Raises:
        ValueError: a field is malformed (the message would be dead-lettered).
    """
    headers = Headers.table(MessageKind.EVENT, request.tenant, request.instance_id)
    if not 1 <= len(request.type.encode()) <= MAX_NAME_BYTES:
        raise ValueError(f"event type must be 1 to {MAX_NAME_BYTES} bytes")
    event_id = request.event_id or str(uuid.uuid4())
    if not 1 <= len(event_id.encode()) <= MAX_NAME_BYTES:
        raise ValueError(f"event id must be 1 to {MAX_NAME_BYTES} bytes")
    body = json.dumps(
        {
            "version": SCHEMA_VERSION,
            "event_id": event_id,
            "type": request.type,
            "payload": request.payload,
        }
    ).encode()
    return event_id, Outgoing(
        exchange=topology.ingress_exchange,
        routing_key=routing_key(request.tenant, MessageKind.EVENT),
        body=body,
        headers=headers,
        message_id=f"{request.tenant}/{request.instance_id}/event/{event_id}",
        user_id=user_id,
    )


class Producer:
    """Publishes to the ingress exchange with confirms; use `async with`.

    Every message carries the connection's user as its AMQP user_id, which RabbitMQ checks
    and workers map to the tenant (docs/security.md).
    """

    def __init__(self, amqp_url: str, topology: Topology | None = None) -> None:
        self.topology = topology or Topology()
        self._broker = Broker(amqp_url, self.topology)
        self.user_id = unquote(urlsplit(amqp_url).username or "guest")

    async def __aenter__(self) -> Producer:
        await self._broker.connect(name="stepfleet-producer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._broker.close()

    async def create(self, request: CreateRequest) -> str:
        """Publish one create message; return the instance id once the broker confirmed it."""
        return (await self.create_batch([request]))[0]

    async def create_batch(self, requests: Sequence[CreateRequest]) -> list[str]:
        """Publish many create messages with one confirm wait; return their instance ids."""
        built = [
            create_message(self.topology, request, user_id=self.user_id) for request in requests
        ]
        await self._broker.publish_many([message for _, message in built])
        return [instance_id for instance_id, _ in built]

    async def send_event(self, request: EventRequest) -> str:
        """Publish an event; return its id once the broker confirmed it.

        Sending the same event id twice delivers it once.
        """
        event_id, message = event_message(self.topology, request, user_id=self.user_id)
        await self._broker.publish_many([message])
        return event_id
