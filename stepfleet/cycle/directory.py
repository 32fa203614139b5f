"""Each tenant's limits and producer users, as a worker sees them.

The directory is a copy of the tenants table, refreshed in the background and on a miss, so
the per-delivery lookup is a dictionary lookup.
"""

from __future__ import annotations

import time
from typing import Protocol

from stepfleet.engine import EngineLimits
from stepfleet.schemas import TenantLimits
from stepfleet.store import TenantRecord

_MISS_REFRESH_SECONDS = 1.0


class TenantRows(Protocol):
    """Where the directory reads the tenants table (`PgStore.tenants`)."""

    async def all(self) -> list[TenantRecord]:
        """Every tenant row."""
        ...


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

    async def refresh(self, rows: TenantRows) -> None:
        self.load(await rows.all())

    async def refresh_on_miss(self, rows: TenantRows, users: set[str]) -> None:
        """Reload when a user is unknown (a tenant added a moment ago), at most once a second."""
        unknown = {u for u in users if u not in self._tenant_of_user}
        if unknown and time.monotonic() - self._loaded_at >= _MISS_REFRESH_SECONDS:
            await self.refresh(rows)

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
