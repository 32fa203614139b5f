"""Per-tenant settings: limits that override the fleet's defaults for one tenant."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

_Positive = Annotated[int, Field(ge=1)]


class TenantLimits(BaseModel):
    """Limits for one tenant; a field left out (None) takes the fleet's setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fuel_per_run: Annotated[int, Field(ge=1000)] | None = None
    memory_bytes: Annotated[int, Field(ge=65536)] | None = None
    module_bytes: Annotated[int, Field(ge=1024)] | None = None
    max_steps: _Positive | None = None
    max_state_bytes: Annotated[int, Field(ge=1024)] | None = None
    host_calls_per_step: Annotated[int, Field(ge=0)] | None = None
    """Egress (HTTP) calls one step may make."""
    calls_in_flight: _Positive | None = None
    """Egress (HTTP) calls of this tenant in flight at once, in one worker process."""
    running_steps: _Positive | None = None
    """Steps of this tenant running at once across the whole fleet."""
    steps_per_second: Annotated[float, Field(gt=0)] | None = None
    """Sustained rate of steps across the fleet (bursts up to one second's worth)."""
    weight: Annotated[int, Field(ge=1, le=1000)] | None = None
    """The tenant's share of a worker's turns while tenants contend (1 by default)."""

    def merged(self, update: TenantLimits) -> TenantLimits:
        """These limits with every field `update` sets replaced."""
        return self.model_copy(update=update.model_dump(exclude_none=True))
