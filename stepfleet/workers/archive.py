"""The dead-letter archiver: every worker moves letters from the dead-letter queue into
PostgreSQL, where operators search and replay them (`stepfleet dlq`).

The insert commits before the ack, and each letter has a key of its own, so a letter
redelivered after a crash is archived once: it is always in the queue or in the archive.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import structlog

from stepfleet.broker import BrokerUnavailable, Delivery
from stepfleet.schemas import Headers
from stepfleet.store import NewDeadLetter, PgStore
from stepfleet.workers.outgoing import DEAD_LETTER_ID

log = structlog.get_logger("stepfleet.archive")

_BATCH = 100
_WAIT_SECONDS = 0.2


class DeadLetterArchiver:
    """Takes deliveries from the dead-letter queue and archives them in batches."""

    def __init__(self, store: PgStore) -> None:
        self._store = store
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self.archived = 0

    async def on_delivery(self, delivery: Delivery) -> None:
        self._inbox.put_nowait(delivery)

    async def run(self) -> None:
        """Archive until cancelled; a batch that cannot be stored is handed back to the queue."""
        while True:
            batch = [await self._inbox.get()]
            try:
                async with asyncio.timeout(_WAIT_SECONDS):
                    while len(batch) < _BATCH:
                        batch.append(await self._inbox.get())
            except TimeoutError:
                pass
            await self._archive(batch)

    async def _archive(self, batch: list[Delivery]) -> None:
        try:
            new = await self._store.dead_letters.archive([letter_of(d) for d in batch])
        except Exception as exc:  # keep serving: the queue keeps what was not archived
            log.warning("dead_letters_not_archived", count=len(batch), error=str(exc))
            for delivery in batch:
                try:
                    await delivery.release()
                except BrokerUnavailable:
                    return
            await asyncio.sleep(1.0)
            return
        for delivery in batch:
            try:
                await delivery.ack()
            except BrokerUnavailable:
                return  # redelivered later: the letter key makes that a no-op
        self.archived += new
        log.info("dead_letters_archived", count=new, repeats=len(batch) - new)


def letter_of(delivery: Delivery) -> NewDeadLetter:
    """What the archive keeps of a dead letter; RabbitMQ's own letters (delivery limit,
    expiry) carry their reason in x-death instead of stepfleet's headers."""
    headers = {str(k): _plain(v) for k, v in delivery.headers.items()}
    if delivery.user_id and "x-original-user-id" not in headers:
        # RabbitMQ dead-lettered the message itself: its user_id property is the sender.
        headers["x-original-user-id"] = delivery.user_id
    reason = _text(headers.get(Headers.DEAD_REASON))
    detail = _text(headers.get(Headers.DEAD_DETAIL))
    if reason is None:
        reason, detail = _broker_reason(headers)
    key = _text(headers.get(DEAD_LETTER_ID)) or _content_key(delivery, headers)
    return NewDeadLetter(
        letter_key=key,
        reason=reason,
        detail=detail or "",
        routing_key=_text(headers.get("x-original-routing-key")) or delivery.routing_key,
        headers=headers,
        body=delivery.body,
        message_id=delivery.message_id,
        tenant=_text(headers.get(Headers.TENANT)),
        instance_id=_text(headers.get(Headers.INSTANCE)),
        kind=_text(headers.get(Headers.KIND)),
        module=_text(headers.get(Headers.MODULE)),
    )


def _broker_reason(headers: Mapping[str, Any]) -> tuple[str, str]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]
        why = str(death.get("reason", "unknown")).replace("_", "-")
        detail = (
            f"RabbitMQ dead-lettered it from {death.get('queue')} ({why}) after "
            f"{death.get('count', '?')} time(s); no worker could finish it"
        )
        return why, detail
    return "unknown", "dead-lettered without a reason"


def _content_key(delivery: Delivery, headers: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(delivery.routing_key.encode())
    digest.update(json.dumps(headers, sort_keys=True, default=str).encode())
    digest.update(delivery.body)
    return "sha256:" + digest.hexdigest()


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
