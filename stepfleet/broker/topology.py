"""Names and arguments of every exchange and queue stepfleet declares (see docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepfleet.schemas import MessageKind


@dataclass(frozen=True, slots=True)
class Topology:
    """The broker objects of one stepfleet deployment; `prefix` keeps deployments apart."""

    prefix: str = "stepfleet"
    delivery_limit: int = 20
    lanes: int = 8
    """Work queues; each message goes to one of them by a hash of its routing key."""
    side_lanes: int = 16
    """Work queues a worker moves a heavy tenant's deliveries to (workers/side_lanes.py)."""

    @property
    def ingress_exchange(self) -> str:
        """Topic exchange producers publish create and event messages to."""
        return f"{self.prefix}.ingress"

    @property
    def internal_exchange(self) -> str:
        """Topic exchange only workers publish step and wake messages to."""
        return f"{self.prefix}.internal"

    @property
    def lanes_exchange(self) -> str:
        """Consistent-hash exchange spreading messages over the work queues by routing key."""
        return f"{self.prefix}.lanes-by-key"

    @property
    def placement_exchange(self) -> str:
        """Topic exchange that places creates, steps and wakes: the keys of a tenant that
        floods are bound to its side lane while it does (workers/placement.py); every other
        message goes on to the lanes, its alternate exchange."""
        return f"{self.prefix}.placement"

    def placement_exchange_arguments(self) -> dict[str, Any]:
        """What the placement exchange cannot route (no tenant bound aside) goes to the lanes."""
        return {"alternate-exchange": self.lanes_exchange}

    def aside_key(self, tenant: str) -> str:
        """The placement binding key of every create, step and wake of `tenant`."""
        return f"{tenant}.*"

    @property
    def legacy_lanes_exchange(self) -> str:
        """The lanes exchange of releases that hashed the producer-set x-tenant header;
        `declare` deletes it, so no message is placed by a header a producer chose."""
        return f"{self.prefix}.lanes"

    @property
    def work_queues(self) -> list[str]:
        """The lanes: quorum queues every worker consumes, one consumer each."""
        return [f"{self.prefix}.work.{lane}" for lane in range(self.lanes)]

    @property
    def side_exchange(self) -> str:
        """Direct exchange into the side lanes, bound with each one's index as the key."""
        return f"{self.prefix}.side"

    @property
    def side_queues(self) -> list[str]:
        """The side lanes: quorum queues every worker consumes, like the lanes, holding the
        deliveries workers moved out of the lanes for tenants over their share."""
        return [f"{self.prefix}.side.{lane}" for lane in range(self.side_lanes)]

    def lanes_exchange_arguments(self) -> dict[str, Any]:
        """None: the exchange hashes the routing key, which broker topic permissions confine
        to the producer's own tenant (RabbitMQ hashes only the first routing key, so CC and
        BCC headers cannot steer a message into another lane either)."""
        return {}

    def lane_bindings(self) -> list[tuple[str, str]]:
        """(exchange, binding key) pairs feeding the lanes directly: events, which are never
        placed aside (a producer's events keep their order)."""
        return [(self.ingress_exchange, f"*.{MessageKind.EVENT.value}")]

    def placement_bindings(self) -> list[tuple[str, str]]:
        """(exchange, binding key) pairs feeding the placement exchange: exactly
        `<tenant>.<kind>` for the kinds each exchange carries, so a producer has only its
        tenant's keys to hash."""
        return [
            (self.ingress_exchange, f"*.{MessageKind.CREATE.value}"),
            (self.internal_exchange, f"*.{MessageKind.STEP.value}"),
            (self.internal_exchange, f"*.{MessageKind.WAKE.value}"),
        ]

    @property
    def dead_letter_exchange(self) -> str:
        """Fanout exchange for messages that can never be processed."""
        return f"{self.prefix}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        """Quorum queue holding dead letters until a worker archives them in PostgreSQL."""
        return f"{self.prefix}.dead"

    def work_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the work queue: replicated, bounded redelivery, safe dead-lettering."""
        return {
            "x-queue-type": "quorum",
            # Crash-loop safety net: a message that kills workers repeatedly ends up dead.
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            # At-least-once dead-lettering needs reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the dead-letter queue."""
        return {"x-queue-type": "quorum"}


def routing_key(tenant: str, kind: MessageKind) -> str:
    """Return the routing key of a message: the tenant first, so topic permissions apply."""
    return f"{tenant}.{kind.value}"
