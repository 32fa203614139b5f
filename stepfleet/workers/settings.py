"""Worker and CLI settings, read once from the environment (prefix STEPFLEET_)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stepfleet.broker import Topology
from stepfleet.engine import EngineLimits
from stepfleet.sandbox import SandboxLimits
from stepfleet.workers.environment import DEFAULT_DATABASE_URL, ENV_PREFIX


def _default_module_cache_dir() -> Path | None:
    """$XDG_CACHE_HOME/stepfleet/modules, else ~/.cache/stepfleet/modules (None: no home)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:
            return None
    return Path(base) / "stepfleet" / "modules"


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


class Settings(BaseSettings):
    """Everything a worker or the CLI needs to know; frozen once built."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    """Also read without pydantic by `stepfleet status` (workers/environment.py)."""
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    prefix: str = Field(default="stepfleet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,60}$")
    rabbitmq_admin_url: str = "http://guest:guest@127.0.0.1:15672"
    """RabbitMQ's management API, used by `stepfleet tenant add` to create producer users."""
    platform_users: str = ""
    """Comma-separated broker users trusted to publish for any tenant (a platform's backend).
    The user of STEPFLEET_AMQP_URL (the fleet's own) is always trusted."""
    verify_producers: bool = True
    """Require ingress messages to carry a user_id that is the tenant's producer or a
    platform user. Turning it off trusts the x-tenant header (for closed test setups only)."""

    concurrency: int = Field(default=2, ge=1, le=64)
    """Batches in flight at once per worker process, each on its own database connection."""
    batch_size: int = Field(default=64, ge=1, le=1000)
    """Deliveries that may share one transaction and one confirm wait."""
    delivery_limit: int = Field(default=20, ge=2)
    lanes: int = Field(default=8, ge=1, le=256)
    """Work queues tenants are spread over; fixed for a deployment (see docs/protocol.md)."""
    side_lanes: int = Field(default=16, ge=0, le=256)
    """Work queues a worker moves a tenant's deliveries to while that tenant holds more than
    its share of the worker (see tenant_backlog); 0 moves none."""
    tenant_backlog: int = Field(default=64, ge=1)
    """Deliveries of one tenant waiting in a worker process before it moves that tenant's
    further deliveries out of the lanes into a side lane, so the lanes keep moving for the
    others. Keep it well below a lane's prefetch (`lane_prefetch`), or a lane's window fills
    with one tenant before any is moved."""

    max_message_bytes: int = Field(default=1024 * 1024 + 4096, ge=1024)
    dead_letter_tenant_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """What the dead-letter archive keeps of one tenant's letters (bodies and headers); past
    it a letter keeps only its metadata. Purging gives the room back."""
    fuel_per_run: int = Field(default=2_000_000_000, ge=1_000)
    memory_bytes: int = Field(default=64 * 1024 * 1024, ge=65536)
    value_bytes: int = Field(default=1024 * 1024, ge=1024)
    module_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    module_functions: int = Field(default=20_000, ge=1)
    """Functions one module may define; checked at push and before a worker compiles."""
    function_body_bytes: int = Field(default=256 * 1024, ge=1024)
    """Code size of one function of a module."""
    function_locals: int = Field(default=2_000, ge=1)
    """Locals one function of a module may declare."""
    compile_timeout_seconds: int = Field(default=30, ge=1)
    """CPU seconds compiling one module may take (push or worker), in a process of its own;
    that process is also killed after twice this plus 5 s of wall-clock time."""
    compile_memory_bytes: int = Field(default=1024**3, ge=64 * 1024 * 1024)
    """Address space of that process."""
    module_cache_dir: Annotated[Path | None, BeforeValidator(_empty_is_none)] = Field(
        default_factory=_default_module_cache_dir
    )
    """Precompiled modules on local disk, private to this user (0700); empty disables it."""
    module_cache_bytes: int = Field(default=1024**3, ge=0)
    """Bound on that directory; least recently used artifacts are evicted past it (0 disables)."""
    module_cache_key: Annotated[SecretStr | None, BeforeValidator(_empty_is_none)] = None
    """HMAC key (16+ bytes) sealing the artifacts; unset: a random key file in the directory."""

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
    secret_key: SecretStr | None = None
    """Fernet key(s), comma-separated (the first seals), for tenants' egress secrets."""
    egress_timeout_seconds: float = Field(default=10.0, gt=0)
    host_calls_per_step: int = Field(default=10, ge=0)
    """Egress (HTTP) calls one step may make, unless the tenant's limits say otherwise."""
    max_inflight: int = Field(default=1000, ge=1)
    """HTTP calls one worker process has in flight at once (steps waiting on them hold no
    transaction, no row lock and no guest thread)."""
    tenant_inflight: int = Field(default=250, ge=1)
    """HTTP calls of one tenant one worker process has in flight at once, unless the tenant's
    limits say otherwise (`calls_in_flight`)."""

    health_file: Annotated[Path | None, BeforeValidator(_empty_is_none)] = Path(
        "/tmp/stepfleet-worker.health"  # noqa: S108 (the container's own /tmp)
    )
    """Where a worker writes its health for `stepfleet health`; empty to write none."""
    crash_points: str = ""
    """Fault injection for tests only: `after-commit:0.02,after-publish:0.02`."""

    timer_poll_seconds: float = Field(default=0.5, gt=0)
    wake_resend_seconds: float = Field(default=30.0, gt=0)
    """A wake sent but not processed after this long is sent again."""
    outbox_relay_after_seconds: float = Field(default=10.0, gt=0)
    local_steps: int = Field(default=1024, ge=0)
    """Next steps a worker process may take on itself at once instead of publishing them
    (0: publish every one). Each keeps its outbox row until its step is written, so a worker
    that dies holding them leaves them to the outbox relay; keep the time they wait well under
    outbox_relay_after_seconds, or the relay sends copies (harmless, but run twice)."""
    chain_steps: int = Field(default=16, ge=1, le=1000)
    """Steps of one instance a worker may run one after another before writing them all in
    one statement, when each leaves the next to be taken at once (1: write every step before
    running the next). A crash before that write loses the runs, not the steps: they run
    again."""
    early_event_seconds: float = Field(default=600.0, ge=0)
    """How long an event for an instance that does not exist yet is held for its create;
    then it is dead-lettered `unknown-instance` (0: at once, holding nothing)."""
    early_event_tenant_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    """What one tenant's held early events may store at once (payloads, and their dead
    letters' headers and bodies); an early event past it is dead-lettered `unknown-instance`
    at once instead of held."""
    stall_after_seconds: float = Field(default=300.0, gt=0)
    """A live instance with no timer, no outbox row and no progress for this long is taken
    for one whose step message was lost: the stall sweep publishes its step again (a copy of
    a message still queued is acked without effect). Must exceed outbox_relay_after_seconds,
    and should exceed the longest a step message may wait in a queue and the longest step,
    its HTTP calls included (docs/reliability.md)."""
    shutdown_grace_seconds: float = Field(default=30.0, gt=0)
    guest_processes: int = Field(default=1, ge=0, le=16)
    """Guest processes per worker process for long guest runs (those past the inline slice),
    at a lower CPU priority, taken by the tenants in turn; 0 runs them on the one guest thread
    (see docs/architecture.md, *The per-step path and its speed*)."""

    metrics_port: Annotated[int | None, BeforeValidator(_empty_is_none)] = Field(
        default=None, ge=0, le=65535
    )
    """Where a worker serves Prometheus metrics at `/metrics`; unset: no metrics at all
    (0: any free port, which the worker logs)."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 (a container's own interfaces)
    """The address the metrics endpoint binds."""
    metrics_tenants: str = ""
    """Comma-separated tenants that get a `tenant` label value of their own in the metrics;
    every other tenant is counted as `other`, so the series stay bounded."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    @model_validator(mode="after")
    def _sweep_after_relay(self) -> Settings:
        if self.stall_after_seconds <= self.outbox_relay_after_seconds:
            raise ValueError(
                f"stall_after_seconds ({self.stall_after_seconds}) must be more than "
                f"outbox_relay_after_seconds ({self.outbox_relay_after_seconds}): an instance "
                "with an outbox row is the relay's to move"
            )
        return self

    @property
    def stall_sweep_seconds(self) -> float:
        """How often each worker tries the stall sweep: a quarter of stall_after_seconds,
        between 0.5 s and 60 s."""
        return min(max(self.stall_after_seconds / 4, 0.5), 60.0)

    @property
    def prefetch(self) -> int:
        """Deliveries the broker may hand one worker before it acks: two batches per slot."""
        return self.concurrency * self.batch_size * 2

    def lane_prefetch(self, lanes: int) -> int:
        """What one lane's consumer may hold unacked: its share of the batches, plus room for
        one tenant's calls in flight (a tenant's messages share one lane per kind)."""
        return max(self.batch_size, self.prefetch // lanes) + self.tenant_inflight

    def topology(self) -> Topology:
        """The broker objects these settings name."""
        return Topology(self.prefix, self.delivery_limit, self.lanes, self.side_lanes)

    @property
    def vhost(self) -> str:
        """The RabbitMQ virtual host of STEPFLEET_AMQP_URL ("/" when the URL names none)."""
        from stepfleet.broker.cluster import broker_urls  # aio-pika: only when asked

        path = urlsplit(broker_urls(self.amqp_url)[0]).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def broker_user(self) -> str:
        """The user the fleet connects to RabbitMQ as (the first URL's)."""
        from stepfleet.broker.cluster import broker_urls  # aio-pika: only when asked

        return unquote(urlsplit(broker_urls(self.amqp_url)[0]).username or "guest")

    @property
    def trusted_users(self) -> frozenset[str]:
        """The fleet's own broker user and the configured platform users."""
        users = {u.strip() for u in self.platform_users.split(",") if u.strip()}
        users.add(self.broker_user)
        return frozenset(users)

    @property
    def metric_tenants(self) -> frozenset[str]:
        """The tenants named in STEPFLEET_METRICS_TENANTS."""
        return frozenset(t.strip() for t in self.metrics_tenants.split(",") if t.strip())

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
            module_functions=self.module_functions,
            function_body_bytes=self.function_body_bytes,
            function_locals=self.function_locals,
            compile_timeout_seconds=self.compile_timeout_seconds,
            compile_memory_bytes=self.compile_memory_bytes,
            max_sleep_ms=self.max_sleep_seconds * 1000,
            host_calls_per_step=self.host_calls_per_step,
        )

    def engine_limits(self) -> EngineLimits:
        """The per-instance limits these settings describe."""
        return EngineLimits(
            max_steps=self.max_steps,
            max_state_bytes=self.max_state_bytes,
            max_sleep_ms=self.max_sleep_seconds * 1000,
            default_event_timeout_ms=self.default_event_timeout_seconds * 1000,
        )
