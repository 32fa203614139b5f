"""What the API and the console share: the store, the broker, who a request is, and the
operator actions of `stepfleet.control` run under the token's name."""

from __future__ import annotations

import asyncio
import glob
import json
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from stepfleet.api.auth import Principal, Role, secret_hash
from stepfleet.api.errors import ApiError
from stepfleet.api.settings import ApiSettings
from stepfleet.broker import Broker, BrokerError
from stepfleet.control import Control, ControlError, DeadLetters, ModuleCache
from stepfleet.schemas import InstanceKey, is_instance_id, is_tenant
from stepfleet.store import DeadLetter, PgStore
from stepfleet.workers.health import Health, judge
from stepfleet.workers.settings import Settings

log = structlog.get_logger("stepfleet.api")
T = TypeVar("T")

_BROKER_RETRY_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """One worker as its health file tells it."""

    file: str
    healthy: bool
    why: str
    name: str | None = None
    state: str | None = None
    steps: int | None = None
    age_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Done:
    """The outcome of an action: `published` is False when the broker could not be reached
    after the commit (the outbox relay of any worker publishes what it queued)."""

    value: Any
    published: bool = True


class Fleet:
    """The services behind one API process."""

    def __init__(self, settings: Settings, api: ApiSettings) -> None:
        self.settings = settings
        self.api = api
        self.topology = settings.topology()
        self.store = PgStore(
            settings.database_url, pool_size=4, retention_seconds=settings.retention_seconds
        )
        self._broker: Broker | None = None
        self._broker_tried = 0.0
        self._broker_lock = asyncio.Lock()

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.close()
        await self.store.close()

    async def broker(self) -> Broker | None:
        """The broker connection, made on first need; None while RabbitMQ cannot be reached
        (tried again at most every few seconds)."""
        async with self._broker_lock:
            if self._broker is not None and self._broker.connected:
                return self._broker
            now = time.monotonic()
            if now - self._broker_tried < _BROKER_RETRY_SECONDS:
                return self._broker
            self._broker_tried = now
            broker = Broker(self.settings.amqp_url, self.topology)
            try:
                await broker.connect(name="stepfleet-api")
            except BrokerError as exc:
                log.warning("api_broker_unreachable", error=str(exc))
                return None
            self._broker = broker
            return broker

    # -- who ---------------------------------------------------------------------------

    async def principal(self, secret: str | None) -> Principal | None:
        """The token a secret belongs to, if it is live."""
        if not secret or len(secret) > 200:
            return None
        record = await self.store.tokens.by_secret(secret_hash(secret))
        if record is None:
            return None
        return Principal(record.name, Role(record.role), record.tenant)

    # -- what --------------------------------------------------------------------------

    def tenant_filter(self, principal: Principal, tenant: str | None) -> str | None:
        """The tenant a listing is narrowed to: the token's own, or the one asked for (a
        scoped token asking for another tenant gets nothing: 404)."""
        if tenant is not None and not is_tenant(tenant):
            raise ApiError(422, f"{tenant!r} is not a tenant name")
        if principal.tenant is None:
            return tenant
        if tenant is not None and tenant != principal.tenant:
            raise ApiError(404, f"no tenant {tenant!r}")
        return principal.tenant

    async def instance_key(
        self, principal: Principal, tenant: str, instance_id: str
    ) -> InstanceKey:
        """The key of an instance the token may see, or 404."""
        if not is_tenant(tenant) or not is_instance_id(instance_id):
            raise ApiError(422, "not a tenant name and instance id")
        key = InstanceKey(tenant, instance_id)
        if not principal.sees(tenant) or not await self.store.find_instances(instance_id, tenant):
            raise ApiError(404, f"no instance {instance_id!r} for tenant {tenant!r}")
        return key

    async def letter(self, principal: Principal, letter_id: int) -> DeadLetter:
        """An archived letter the token may see, or 404."""
        letter = await self.store.browse.letter(letter_id)
        if letter is None or not principal.sees(letter.tenant):
            raise ApiError(404, f"no dead letter {letter_id}")
        return letter

    def control(self, principal: Principal, broker: Broker | None) -> Control:
        return Control(self.store, broker, self.topology, actor=principal.name)

    def module_cache(self) -> ModuleCache:
        """Where a worker of this host keeps compiled modules: a push leaves its artifact."""
        s = self.settings
        return ModuleCache(s.module_cache_dir, s.module_cache_bytes, s.module_cache_key)

    def dead_letters(self, principal: Principal, broker: Broker | None) -> DeadLetters:
        return DeadLetters(
            self.store,
            broker,
            self.topology,
            user_id=self.settings.broker_user,
            trusted_users=self.settings.trusted_users,
            actor=principal.name,
        )

    async def act(self, work: Awaitable[T], *, broker: Broker | None) -> Done:
        """Run an operator action whose messages go through `broker`: its refusal is a 409;
        without a broker, or one lost after the commit, the outbox relay publishes them."""
        try:
            return Done(await work, published=broker is not None)
        except ControlError as exc:
            raise ApiError(409, str(exc)) from None
        except BrokerError as exc:
            log.warning("api_publish_deferred", error=str(exc))
            return Done(None, published=False)

    # -- the overview ------------------------------------------------------------------

    def workers(self) -> list[WorkerHealth]:
        """Workers whose health files this process can read."""
        pattern = self.api.health_files
        paths = (
            sorted(glob.glob(pattern))
            if pattern
            else ([str(self.settings.health_file)] if self.settings.health_file else [])
        )
        found = []
        for name in paths[:200]:
            healthy, why = judge(Path(name), max_age=15.0)
            health = _read_health(Path(name))
            found.append(
                WorkerHealth(
                    file=name,
                    healthy=healthy,
                    why=why,
                    name=health.name if health else None,
                    state=health.state if health else None,
                    steps=health.steps if health else None,
                    age_seconds=round(time.time() - health.at, 1) if health else None,
                )
            )
        return found

    async def queue_depths(self) -> dict[str, int] | None:
        """Messages ready per queue, or None when RabbitMQ cannot be reached."""
        broker = await self.broker()
        if broker is None:
            return None
        try:
            return await asyncio.wait_for(broker.queue_depths(), 5)
        except (BrokerError, TimeoutError) as exc:
            log.warning("api_queue_depths_unavailable", error=str(exc))
            return None

    async def overview(self, principal: Principal) -> dict[str, Any]:
        """What the fleet is doing: workers, queues, instances, dead letters, steps/s."""
        tenant = principal.tenant
        window = 60.0
        browse = self.store.browse
        # Independent reads: asked at once, each on its own pooled connection.
        entries, by_status, by_reason, queues = await asyncio.gather(
            browse.journal_entries_since(window, tenant),
            browse.status_counts(tenant),
            browse.letters_by_reason(tenant),
            self.queue_depths() if tenant is None else _nothing(),
        )
        return {
            "tenant": tenant,
            "workers": [asdict(w) for w in self.workers()] if tenant is None else [],
            "queues": queues,
            "instances_by_status": by_status,
            "dead_letters_by_reason": by_reason,
            "journal_entries_last_minute": entries,
            "steps_per_second": round(entries / window, 2),
        }


async def _nothing() -> None:
    return None


def _read_health(path: Path) -> Health | None:
    try:
        return Health(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
