"""Who may publish for which tenant, and each tenant's limits, as a worker sees them.

The directory is a copy of the tenants table, refreshed in the background and on a miss, so
the per-delivery check is a dictionary lookup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from stepfleet.broker import Delivery, Topology
from stepfleet.cycle.messages import REPLAYED_FOR
from stepfleet.engine import EngineLimits
from stepfleet.schemas import DeadReason, Envelope, MessageKind, TenantLimits
from stepfleet.store import PgStore, TenantRecord

_PRODUCER_KINDS = frozenset({MessageKind.CREATE, MessageKind.EVENT})
_FLEET_KINDS = frozenset({MessageKind.STEP, MessageKind.WAKE})
_MISS_REFRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a delivery may not act for the tenant it names (a dead-letter reason)."""

    reason: DeadReason
    detail: str


class TenantDirectory:
    """Broker users to tenants, and tenants to their limits."""

    def __init__(self, defaults: EngineLimits) -> None:
        self._defaults = defaults
        self._tenant_of_user: dict[str, str] = {}
        self._limits: dict[str, TenantLimits] = {}
        self._engine_limits: dict[str, EngineLimits] = {}
        self._loaded_at = 0.0

    def load(self, tenants: list[TenantRecord]) -> None:
        """Replace the directory with the tenants table's current rows."""
        self._tenant_of_user = {t.broker_user: t.name for t in tenants if t.broker_user}
        self._limits = {t.name: t.limits for t in tenants if t.limits != TenantLimits()}
        self._engine_limits = {}
        self._loaded_at = time.monotonic()

    async def refresh(self, store: PgStore) -> None:
        self.load(await store.tenants.all())

    async def refresh_on_miss(self, store: PgStore, users: set[str]) -> None:
        """Reload when a user is unknown (a tenant added a moment ago), at most once a second."""
        unknown = {u for u in users if u not in self._tenant_of_user}
        if unknown and time.monotonic() - self._loaded_at >= _MISS_REFRESH_SECONDS:
            await self.refresh(store)

    def tenant_of(self, user: str) -> str | None:
        return self._tenant_of_user.get(user)

    def limits(self, tenant: str) -> TenantLimits:
        """The tenant's own limits (fields left None take the fleet's settings)."""
        return self._limits.get(tenant, _NO_LIMITS)

    def engine_limits(self, tenant: str) -> EngineLimits:
        """The engine's limits for the tenant: the fleet's, with the tenant's overrides."""
        cached = self._engine_limits.get(tenant)
        if cached is None:
            own = self.limits(tenant)
            cached = EngineLimits(
                max_steps=own.max_steps or self._defaults.max_steps,
                max_state_bytes=own.max_state_bytes or self._defaults.max_state_bytes,
                max_sleep_ms=self._defaults.max_sleep_ms,
                default_event_timeout_ms=self._defaults.default_event_timeout_ms,
            )
            self._engine_limits[tenant] = cached
        return cached


_NO_LIMITS = TenantLimits()


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
    ) -> None:
        self._topology = topology
        self._directory = directory
        self._platform_users = platform_users
        self._fleet_user = fleet_user

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
