"""Who may publish for which tenant: producers are known by their broker user."""

from __future__ import annotations

from dataclasses import dataclass

from stepfleet.broker import Delivery, Topology
from stepfleet.cycle.directory import TenantDirectory, TenantRows
from stepfleet.cycle.messages import REPLAYED_FOR
from stepfleet.schemas import DeadReason, Envelope, MessageKind

_PRODUCER_KINDS = frozenset({MessageKind.CREATE, MessageKind.EVENT})
_FLEET_KINDS = frozenset({MessageKind.STEP, MessageKind.WAKE})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a delivery may not act for the tenant it names (a dead-letter reason)."""

    reason: DeadReason
    detail: str


class ProducerCheck:
    """Routing headers are hints: a producer's tenant comes from its broker user.

    RabbitMQ rejects a message whose `user_id` property differs from the publishing
    connection's user, but accepts one without it, so ingress messages must carry it. Only
    the fleet's own users can publish to the internal exchange (broker permissions).

    A dead letter the fleet replays comes through the ingress exchange as the fleet's user,
    naming the producer that first published it in `x-replayed-for`; that producer is checked
    as if it had published the message again. The header counts only on a message whose
    verified user_id is the fleet's own: from anyone else it is ignored.
    """

    def __init__(
        self,
        topology: Topology,
        directory: TenantDirectory,
        platform_users: frozenset[str],
        *,
        fleet_user: str,
        rows: TenantRows | None = None,
    ) -> None:
        """`rows` is where the directory is reloaded from when a user is unknown."""
        self._topology = topology
        self._rows = rows
        self._directory = directory
        self._platform_users = platform_users
        self._fleet_user = fleet_user

    async def refresh_on_miss(self, users: set[str]) -> None:
        """Reload the directory when one of `users` is unknown (a tenant added just now). The
        fleet's and the platform's users are never in it: a reload for them (every step the
        fleet publishes) read the whole tenants table once a second, 20-50 ms of the batch
        with 1,000 tenants."""
        if self._rows is not None:
            users = users - self._platform_users - {self._fleet_user}
            if users:
                await self._directory.refresh_on_miss(self._rows, users)

    def check(self, delivery: Delivery, envelope: Envelope) -> Refusal | None:
        """Return why the delivery may not act for its tenant, or None when it may."""
        kind = envelope.kind
        if delivery.exchange == self._topology.internal_exchange:
            if kind not in _FLEET_KINDS:
                return Refusal(DeadReason.KIND_NOT_ALLOWED, f"{kind} messages come from producers")
            return None
        if kind not in _PRODUCER_KINDS:
            return Refusal(
                DeadReason.KIND_NOT_ALLOWED, f"producers may publish create and event, not {kind}"
            )
        user = delivery.user_id
        if not user:
            return Refusal(
                DeadReason.UNVERIFIED_PRODUCER,
                "the message has no user_id property: set it to the broker user you connect as",
            )
        replayed = ""
        if user == self._fleet_user and REPLAYED_FOR in delivery.headers:
            user = _text(delivery.headers[REPLAYED_FOR])
            if not user:
                return Refusal(
                    DeadReason.UNVERIFIED_PRODUCER, "a replayed message names no producer"
                )
            replayed = " (replayed by the fleet)"
        if user in self._platform_users:
            return None
        tenant = self._directory.tenant_of(user)
        if tenant is None:
            return Refusal(
                DeadReason.UNVERIFIED_PRODUCER,
                f"broker user {user!r} is no tenant's producer{replayed}",
            )
        if tenant != envelope.tenant:
            return Refusal(
                DeadReason.TENANT_MISMATCH,
                f"broker user {user!r} publishes for tenant {tenant!r}, "
                f"not {envelope.tenant!r}{replayed}",
            )
        return None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="backslashreplace")
    return value if isinstance(value, str) else ""
