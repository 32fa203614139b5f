"""Messages workers publish: the next step of an instance, and dead letters."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from stepfleet.broker import Delivery, Outgoing, Topology
from stepfleet.broker.topology import routing_key
from stepfleet.engine import due_us
from stepfleet.schemas import SCHEMA_VERSION, DeadReason, Headers, InstanceKey, MessageKind
from stepfleet.schemas.messages import SENDER_SELECTED
from stepfleet.store import DueTimer, OutboxMessage


def step_message(
    topology: Topology,
    key: InstanceKey,
    module: str,
    position: int,
    generation: int,
    traceparent: str | None = None,
) -> tuple[OutboxMessage, Outgoing]:
    """Build the message that asks a worker to run the step at `position`.

    Returns the outbox row and the same message ready to publish, so the per-step path never
    parses back what it has just serialised (the relay uses `from_outbox` instead).
    """
    # Unchecked headers (here and in wake_message): the fleet read them from its own store.
    headers = Headers.table(
        MessageKind.STEP, key.tenant, key.instance_id, module, traceparent, check=False
    )
    row = OutboxMessage(
        routing_key=routing_key(key.tenant, MessageKind.STEP),
        headers=json.dumps(headers, separators=(",", ":")),
        body=b'{"version":%d,"position":%d,"generation":%d}'
        % (SCHEMA_VERSION, position, generation),
    )
    return row, Outgoing(
        exchange=topology.internal_exchange,
        routing_key=row.routing_key,
        body=row.body,
        headers=headers,
        message_id=_message_id(headers, position),
    )


def wake_message(topology: Topology, timer: DueTimer) -> Outgoing:
    """Build the message that ends a due timer's wait (published straight, not via the outbox:
    the timer row itself is the durable record, and an unprocessed wake is sent again); it
    carries the instance's trace context."""
    key = timer.key
    headers = Headers.table(
        MessageKind.WAKE, key.tenant, key.instance_id, timer.module, timer.traceparent, check=False
    )
    body = b'{"version":%d,"position":%d,"attempt":%d,"generation":%d,"due_us":%d}' % (
        SCHEMA_VERSION,
        timer.position,
        timer.attempt,
        timer.generation,
        due_us(timer.wake_at),
    )
    return Outgoing(
        exchange=topology.internal_exchange,
        routing_key=routing_key(timer.key.tenant, MessageKind.WAKE),
        body=body,
        headers=headers,
        message_id=f"{_message_id(headers, timer.position)}/{timer.attempt}",
    )


def from_outbox(topology: Topology, message: OutboxMessage, *, user_id: str) -> Outgoing:
    """Turn an outbox row into a message: a step for the internal exchange, or a replayed
    dead letter for its own exchange (published as the fleet's user, `user_id`)."""
    headers: dict[str, Any] = json.loads(message.headers)
    if message.exchange is not None:
        return Outgoing(
            exchange=message.exchange,
            routing_key=message.routing_key,
            body=message.body,
            headers=headers,
            message_id=headers.pop(REPLAY_ID_HEADER, None),
            user_id=user_id if message.exchange == topology.ingress_exchange else None,
        )
    position = json.loads(message.body).get("position")
    return Outgoing(
        exchange=topology.internal_exchange,
        routing_key=message.routing_key,
        body=message.body,
        headers=headers,
        message_id=_message_id(headers, position),
    )


REPLAY_ID_HEADER = "x-stepfleet-message-id"
"""Carries a replayed letter's message id through its outbox row (a property, not a header)."""


def _message_id(headers: Mapping[str, Any], position: object) -> str:
    return (
        f"{headers.get(Headers.TENANT)}/{headers.get(Headers.INSTANCE)}"
        f"/{headers.get(Headers.KIND)}/{position}"
    )


DEAD_LETTER_ID = "x-dead-letter-id"
"""Names one dead-lettering, so the archive stores a redelivered dead letter once."""

REPLAYED_FOR = "x-replayed-for"
"""On a dead letter the fleet replays to the ingress exchange: the broker user that published
the original. ProducerCheck checks that user, and trusts the header only on a message whose
verified user_id is the fleet's own."""

MOVED_KEY = "x-moved-key"
MOVED_EXCHANGE = "x-moved-exchange"
MOVED_USER = "x-moved-user"
"""On a message a worker moved from a lane to a side lane (workers/side_lanes.py): its original
routing key, exchange and user_id. Trusted only on a side lane's message whose verified user_id
is the fleet's own."""

_RESERVED_PREFIXES = ("x-dead-", "x-original-", "x-first-death-", "x-last-death-", "x-moved-")
_RESERVED = frozenset(
    {"x-death", "x-delivery-count", DEAD_LETTER_ID, REPLAYED_FOR, REPLAY_ID_HEADER}
    | set(SENDER_SELECTED)
)


def is_reserved(header: str) -> bool:
    """Whether a header is one stepfleet or RabbitMQ writes when dead-lettering or replaying,
    or one that would add routing keys to the fleet's own publish (CC, BCC).

    A producer may send any of them; copied along, they would pass for the fleet's own.
    """
    return header in _RESERVED or header.startswith(_RESERVED_PREFIXES)


def dead_letter(
    topology: Topology, delivery: Delivery, reason: DeadReason, detail: str
) -> Outgoing:
    """Wrap a delivery that can never be processed for the dead-letter exchange.

    The body travels unchanged, and so do the headers, less the reserved ones a producer may
    have sent (`is_reserved`). stepfleet then adds the reason and what the broker vouched for
    about the delivery: its user_id property, the exchange it came through and, on a replay,
    the producer it was replayed for. The letter is published as the fleet's own user
    (Broker.publish_many names it), which is how the archive knows these headers are the
    fleet's and not a producer's.
    """
    headers: dict[str, Any] = {
        str(k): _plain(v) for k, v in delivery.headers.items() if not is_reserved(str(k))
    }
    headers[DEAD_LETTER_ID] = str(uuid.uuid4())
    headers[Headers.DEAD_REASON] = reason.value
    headers[Headers.DEAD_DETAIL] = detail[:1000]
    headers["x-original-routing-key"] = delivery.routing_key
    headers["x-original-exchange"] = delivery.exchange
    if delivery.user_id:
        headers["x-original-user-id"] = delivery.user_id
    replayed_for = delivery.headers.get(REPLAYED_FOR)
    if replayed_for is not None:
        headers["x-original-replayed-for"] = _plain(replayed_for)
    return Outgoing(
        exchange=topology.dead_letter_exchange,
        routing_key=delivery.routing_key,
        body=delivery.body,
        headers=headers,
        message_id=delivery.message_id,
    )


def outbox_row(message: Outgoing) -> OutboxMessage:
    """A message for another exchange (a dead letter) as an outbox row, for `from_outbox`.

    Header values that are AMQP byte strings are kept as text (UTF-8, other bytes as `\\xNN`),
    as the dead-letter archive keeps them."""
    headers = dict(message.headers)
    if message.message_id is not None:
        headers[REPLAY_ID_HEADER] = message.message_id
    return OutboxMessage(
        routing_key=message.routing_key,
        headers=json.dumps(headers, separators=(",", ":"), default=_json_text),
        body=message.body,
        exchange=message.exchange,
    )


def _json_text(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def _plain(value: object) -> object:
    """Keep header values AMQP can carry back; anything exotic becomes its repr."""
    if value is None or isinstance(value, str | bytes | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)
