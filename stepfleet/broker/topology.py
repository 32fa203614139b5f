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
    """Work queues; each tenant's messages all go to one of them (by a hash of x-tenant)."""

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
        """Consistent-hash exchange spreading tenants over the work queues by x-tenant."""
        return f"{self.prefix}.lanes"

    @property
    def work_queues(self) -> list[str]:
        """The lanes: quorum queues every worker consumes, one consumer each.

        A tenant flooding the fleet fills its own lane; the others keep flowing.
        """
        return [f"{self.prefix}.work.{lane}" for lane in range(self.lanes)]

    def lanes_exchange_arguments(self) -> dict[str, Any]:
        """Hash on the tenant header, so a tenant's creates, events and steps share a lane."""
        return {"hash-header": "x-tenant"}

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
