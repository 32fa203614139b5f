"""Worker and CLI settings, read once from the environment (prefix STEPFLEET_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from stepfleet.engine import EngineLimits
from stepfleet.sandbox import SandboxLimits


class Settings(BaseSettings):
    """Everything a worker or the CLI needs to know; frozen once built."""

    model_config = SettingsConfigDict(env_prefix="STEPFLEET_", frozen=True, extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/stepfleet"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    prefix: str = Field(default="stepfleet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,60}$")

    concurrency: int = Field(default=2, ge=1, le=64)
    """Batches in flight at once per worker process, each on its own database connection."""
    batch_size: int = Field(default=64, ge=1, le=1000)
    """Deliveries that may share one transaction and one confirm wait."""
    delivery_limit: int = Field(default=20, ge=2)

    max_message_bytes: int = Field(default=1024 * 1024 + 4096, ge=1024)
    fuel_per_run: int = Field(default=2_000_000_000, ge=1_000)
    memory_bytes: int = Field(default=64 * 1024 * 1024, ge=65536)
    value_bytes: int = Field(default=1024 * 1024, ge=1024)
    module_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    max_steps: int = Field(default=10_000, ge=1)
    """Journal entries per instance."""
    max_state_bytes: int = Field(default=1024**3, ge=1024)
    """Params plus every journal value of one instance."""
    max_sleep_seconds: int = Field(default=365 * 86400, ge=1)
    """Longest sleep, retry delay, step timeout or event timeout."""
    default_event_timeout_seconds: int = Field(default=86400, ge=1)
    retention_days: float = Field(default=30.0, ge=0)
    """How long finished instances are kept when their create does not say."""

    retention_check_seconds: float = Field(default=60.0, gt=0)
    """How often each worker deletes finished instances past their retention."""
    timer_poll_seconds: float = Field(default=0.5, gt=0)
    wake_resend_seconds: float = Field(default=30.0, gt=0)
    """A wake sent but not processed after this long is sent again."""
    outbox_relay_after_seconds: float = Field(default=10.0, gt=0)
    shutdown_grace_seconds: float = Field(default=30.0, gt=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    @property
    def prefetch(self) -> int:
        """Deliveries the broker may hand one worker before it acks: two batches per slot."""
        return self.concurrency * self.batch_size * 2

    @property
    def retention_seconds(self) -> int:
        """The default retention of finished instances."""
        return int(self.retention_days * 86400)

    def sandbox_limits(self) -> SandboxLimits:
        """The sandbox limits these settings describe."""
        return SandboxLimits(
            fuel_per_run=self.fuel_per_run,
            memory_bytes=self.memory_bytes,
            value_bytes=self.value_bytes,
            module_bytes=self.module_bytes,
            max_sleep_ms=self.max_sleep_seconds * 1000,
        )

    def engine_limits(self) -> EngineLimits:
        """The per-instance limits these settings describe."""
        return EngineLimits(
            max_steps=self.max_steps,
            max_state_bytes=self.max_state_bytes,
            max_sleep_ms=self.max_sleep_seconds * 1000,
            default_event_timeout_ms=self.default_event_timeout_seconds * 1000,
        )
