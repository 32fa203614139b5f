"""The dead-letter archiver: every worker moves letters from the dead-letter queue into
PostgreSQL, where operators search and replay them (`stepfleet dlq`).

The insert commits before the ack, and each letter has a key of its own, so a letter
redelivered after a crash is archived once: it is always in the queue or in the archive.

Headers are whatever the publisher sent, so the archive records who sent a letter only from
what RabbitMQ vouches for: the `user_id` property it checks against the publishing
connection, and, on a message the fleet published, RabbitMQ's own `x-death` history (a
producer can send an `x-death` header too, and RabbitMQ builds on it). A replay trusts those
records, never a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog

from stepfleet.broker import BrokerUnavailable, Delivery, Topology
from stepfleet.cycle.messages import DEAD_LETTER_ID, REPLAYED_FOR
from stepfleet.schemas import Headers
from stepfleet.store import Archived, NewDeadLetter, PgStore, StoreUnavailable
from stepfleet.workers.logs import first_line
from stepfleet.workers.settings import Settings

log = structlog.get_logger("stepfleet.archive")

_BATCH = 100
_WAIT_SECONDS = 0.2
_RETRY_SECONDS = 1.0
# A letter the database refuses even as a minimal record is held unacked for a while, then
# handed back: never lost, tried again a minute later rather than in a tight loop.
_HOLD_SECONDS = 60.0
_HOLD_MAX = 50
_MAX_DEPTH = 32

TRUNCATED_BODY_BYTES = 4096
"""What the archive keeps of a body larger than the fleet's message size limit."""


@dataclass(frozen=True, slots=True)
class ArchivePolicy:
    """What the archiver must know of the fleet to judge and bound its letters."""

    topology: Topology
    fleet_user: str
    """The fleet's broker user: what it published (a worker's dead letter) is the fleet's."""
    trusted_users: frozenset[str]
    """The fleet's user and the platform users, trusted to publish for any tenant."""
    max_body_bytes: int
    """A body up to this size (the fleet's message size limit) is kept whole."""
    account_bytes: int | None
    """What one tenant's letters may keep of bodies and headers; None: no bound."""

    @classmethod
    def of(cls, settings: Settings) -> ArchivePolicy:
        return cls(
            topology=settings.topology(),
            fleet_user=settings.broker_user,
            trusted_users=settings.trusted_users,
            max_body_bytes=settings.max_message_bytes,
            account_bytes=settings.dead_letter_tenant_bytes,
        )


class DeadLetterArchiver:
    """Takes deliveries from the dead-letter queue and archives them in batches."""

    def __init__(self, store: PgStore, policy: ArchivePolicy) -> None:
        self._store = store
        self._policy = policy
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._held: set[asyncio.Task[None]] = set()
        self.archived = 0
        self.truncated = 0
        """Letters archived with only a prefix of their body (over the size limit)."""
        self.stripped = 0
        """Letters archived without body and headers (their tenant's archive was full)."""
        self.minimal = 0
        """Letters the database refused as they were, archived as minimal records."""

    async def on_delivery(self, delivery: Delivery) -> None:
        self._inbox.put_nowait(delivery)

    async def run(self) -> None:
        """Archive until cancelled; a batch that cannot be stored is handed back to the queue."""
        try:
            while True:
                batch = [await self._inbox.get()]
                try:
                    async with asyncio.timeout(_WAIT_SECONDS):
                        while len(batch) < _BATCH:
                            batch.append(await self._inbox.get())
                except TimeoutError:
                    pass
                await self._archive(batch)
        finally:
            for task in self._held:  # what they hold goes back to the queue with the channel
                task.cancel()

    async def _archive(self, batch: list[Delivery]) -> None:
        letters = [self._letter(d) for d in batch]
        try:
            archived = await self._store.dead_letters.archive(
                letters, account_bytes=self._policy.account_bytes
            )
        except StoreUnavailable as exc:  # keep serving: the queue keeps what was not archived
            log.warning("dead_letters_not_archived", count=len(batch), error=str(exc))
            await self._hand_back(batch)
            return
        except Exception as exc:
            # The database refused something in the batch: store the letters one by one, so
            # one letter it cannot take holds up no other.
            log.warning("dead_letter_batch_refused", count=len(batch), error=first_line(exc))
            await self._one_by_one(batch, letters)
            return
        self._note(letters, archived)
        for delivery in batch:
            # A delivery of a lost channel is redelivered (its letter key makes that a no-op);
            # the others may have come on a channel opened since, and are still acked.
            with contextlib.suppress(BrokerUnavailable):
                await delivery.ack()
        log.info("dead_letters_archived", count=archived.new, repeats=len(batch) - archived.new)

    async def _one_by_one(self, batch: list[Delivery], letters: list[NewDeadLetter]) -> None:
        for index, (delivery, letter) in enumerate(zip(batch, letters, strict=True)):
            try:
                archived = await self._store_alone(delivery, letter)
            except StoreUnavailable as exc:
                log.warning("dead_letters_not_archived", count=len(batch) - index, error=str(exc))
                await self._hand_back(batch[index:])
                return
            if archived is None:
                await self._hold(delivery)
                continue
            self._note([letter], archived)
            with contextlib.suppress(BrokerUnavailable):
                await delivery.ack()

    async def _store_alone(self, delivery: Delivery, letter: NewDeadLetter) -> Archived | None:
        """Archive one letter, else a minimal record of it; None: not even that."""
        bound = self._policy.account_bytes
        try:
            return await self._store.dead_letters.archive([letter], account_bytes=bound)
        except StoreUnavailable:
            raise
        except Exception as exc:
            minimal = minimal_letter(delivery, self._policy, exc, letter)
            log.warning(
                "dead_letter_archived_minimal",
                tenant=letter.tenant,
                instance=letter.instance_id,
                reason=letter.reason,
                letter_key=minimal.letter_key,
                error=first_line(exc),
            )
        try:
            archived = await self._store.dead_letters.archive([minimal], account_bytes=bound)
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.error(
                "dead_letter_unarchivable",
                tenant=letter.tenant,
                instance=letter.instance_id,
                reason=letter.reason,
                letter_key=minimal.letter_key,
                body_bytes=minimal.body_size,
                body_sha256=minimal.body_sha256,
                error=first_line(exc),
            )
            return None
        self.minimal += archived.new
        return archived

    async def _hold(self, delivery: Delivery) -> None:
        if len(self._held) >= _HOLD_MAX:
            await self._hand_back([delivery])
            return
        task = asyncio.create_task(self._release_later(delivery))
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def _release_later(self, delivery: Delivery) -> None:
        await asyncio.sleep(_HOLD_SECONDS)
        with contextlib.suppress(BrokerUnavailable):
            await delivery.release()

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            with contextlib.suppress(BrokerUnavailable):  # a lost channel's are requeued
                await delivery.release()
        await asyncio.sleep(_RETRY_SECONDS)

    def _letter(self, delivery: Delivery) -> NewDeadLetter:
        try:
            return letter_of(delivery, self._policy)
        except Exception as exc:  # a letter we cannot read is kept raw, never dropped
            log.exception("dead_letter_unreadable")
            return minimal_letter(delivery, self._policy, exc)

    def _note(self, letters: list[NewDeadLetter], archived: Archived) -> None:
        self.archived += archived.new
        self.stripped += len(archived.stripped)
        for letter in archived.stripped:
            log.warning(
                "dead_letter_body_not_kept",
                tenant=letter.tenant,
                instance=letter.instance_id,
                reason=letter.reason,
                body_bytes=letter.body_size,
                bound=self._policy.account_bytes,
            )
        for letter in letters:
            if letter.body_size is not None and letter.body_size > len(letter.body):
                self.truncated += 1
                log.info(
                    "dead_letter_body_truncated",
                    tenant=letter.tenant,
                    instance=letter.instance_id,
                    reason=letter.reason,
                    body_bytes=letter.body_size,
                    kept=len(letter.body),
                )


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a letter came from, as far as the broker vouches for it."""

    source: str
    reason: str
    detail: str
    routing_key: str
    sender: str | None = None
    first_exchange: str | None = None
    key: str | None = None


def letter_of(delivery: Delivery, policy: ArchivePolicy) -> NewDeadLetter:
    """What the archive keeps of a dead letter: its headers as JSON values, its body (a prefix
    of it past the size limit), and who sent it as far as RabbitMQ vouches for that."""
    headers = {str(k): _plain(v) for k, v in delivery.headers.items()}
    origin = _origin(delivery, headers, policy)
    body = delivery.body
    unreplayable = None
    if len(body) > policy.max_body_bytes:
        body = body[:TRUNCATED_BODY_BYTES]
        unreplayable = (
            f"its body of {len(delivery.body)} bytes is over the fleet's limit of "
            f"{policy.max_body_bytes}: the archive kept its first {len(body)} bytes"
        )
    tenant = _text(headers.get(Headers.TENANT))
    account, account_user = None, None
    trusted = origin.sender in policy.trusted_users
    if trusted or origin.first_exchange == policy.topology.internal_exchange:
        account = tenant  # the fleet's or a platform user's word for the tenant
    elif origin.sender:
        account_user = origin.sender  # a producer's letters count against its own tenant
    return NewDeadLetter(
        letter_key=origin.key or _content_key(delivery, headers),
        reason=origin.reason,
        detail=origin.detail,
        routing_key=origin.routing_key,
        headers=headers,
        body=body,
        message_id=delivery.message_id,
        tenant=tenant,
        instance_id=_text(headers.get(Headers.INSTANCE)),
        kind=_text(headers.get(Headers.KIND)),
        module=_text(headers.get(Headers.MODULE)),
        source=origin.source,
        sender=origin.sender,
        first_exchange=origin.first_exchange,
        account=account,
        account_user=account_user,
        body_size=len(delivery.body),
        body_sha256=hashlib.sha256(delivery.body).hexdigest(),
        unreplayable=unreplayable,
    )


def _origin(delivery: Delivery, headers: Mapping[str, Any], policy: ArchivePolicy) -> _Origin:
    topology = policy.topology
    from_fleet = delivery.user_id == policy.fleet_user
    deaths = [d for d in _list(headers.get("x-death")) if isinstance(d, dict)]
    first_death = _text(headers.get("x-first-death-exchange"))
    if first_death is None and deaths:
        first_death = _text(deaths[-1].get("exchange"))
    if from_fleet and (not deaths or first_death == topology.dead_letter_exchange):
        # A worker's dead letter (perhaps dead-lettered once more by RabbitMQ since): the
        # worker wrote every x-original-* and x-dead-* header, after dropping the producer's.
        original_user = _text(headers.get("x-original-user-id"))
        replayed_for = _text(headers.get("x-original-replayed-for"))
        return _Origin(
            "worker",
            reason=_text(headers.get(Headers.DEAD_REASON)) or "unknown",
            detail=_text(headers.get(Headers.DEAD_DETAIL)) or "",
            routing_key=_text(headers.get("x-original-routing-key")) or delivery.routing_key,
            sender=replayed_for
            if replayed_for and original_user == policy.fleet_user
            else original_user,
            first_exchange=_text(headers.get("x-original-exchange")),
            key=_text(headers.get(DEAD_LETTER_ID)),
        )
    if deaths:
        # RabbitMQ dead-lettered the message itself (delivery limit, expiry). Its newest
        # x-death entry is the dead-lettering that just happened; the rest of the history is
        # RabbitMQ's only on a message the fleet published.
        death = deaths[0]
        why = (_text(death.get("reason")) or "unknown").replace("_", "-")
        detail = f"RabbitMQ dead-lettered it from {_text(death.get('queue'))} ({why})"
        if why == "delivery-limit":
            detail += "; no worker could finish it"
        if not from_fleet:
            # Its user_id is the publisher, whatever its headers claim; its first exchange is
            # not vouched for, so it can only ever be replayed as that publisher's message.
            return _Origin("rabbitmq", why, detail, delivery.routing_key, delivery.user_id or None)
        replayed_for = _text(headers.get(REPLAYED_FOR))
        sender = policy.fleet_user
        if first_death == topology.ingress_exchange and replayed_for:
            sender = replayed_for
        return _Origin("rabbitmq", why, detail, delivery.routing_key, sender, first_death)
    # Published straight to the dead-letter exchange by someone who is not the fleet (or by a
    # worker older than this archiver): nothing in it is vouched for.
    who = f"broker user {delivery.user_id!r}" if delivery.user_id else "a publisher without user_id"
    claimed = _text(headers.get(Headers.DEAD_DETAIL))
    return _Origin(
        "other",
        reason=_text(headers.get(Headers.DEAD_REASON)) or "unknown",
        detail=f"published to the dead-letter exchange by {who}, not the fleet"
        + (f"; it says: {claimed}" if claimed else ""),
        routing_key=delivery.routing_key,
    )


def minimal_letter(
    delivery: Delivery,
    policy: ArchivePolicy,
    error: BaseException,
    letter: NewDeadLetter | None = None,
) -> NewDeadLetter:
    """A record of a letter the database would not take as it was: ASCII text only, the raw
    headers as their ASCII repr, the body as bytes (a prefix past the size limit)."""
    body = delivery.body
    if len(body) > policy.max_body_bytes:
        body = body[:TRUNCATED_BODY_BYTES]
    try:
        raw_headers = ascii(dict(delivery.headers))
    except RecursionError:
        raw_headers = "<headers nested too deeply to show>"
    key = letter.letter_key if letter else _raw_key(delivery, raw_headers)
    return NewDeadLetter(
        letter_key=_ascii(key, 200),
        reason=_ascii(letter.reason if letter else "unknown", 100),
        detail=f"kept as a minimal record: the database refused it ({_ascii(first_line(error), 300)})",
        routing_key=_ascii(delivery.routing_key, 300),
        headers={"x-stepfleet-raw-headers": raw_headers},
        body=body,
        message_id=None if delivery.message_id is None else _ascii(delivery.message_id, 300),
        tenant=None if letter is None or letter.tenant is None else _ascii(letter.tenant, 100),
        instance_id=None
        if letter is None or letter.instance_id is None
        else _ascii(letter.instance_id, 200),
        source=letter.source if letter else "other",
        account=None if letter is None or letter.account is None else _ascii(letter.account, 100),
        account_user=None
        if letter is None or letter.account_user is None
        else _ascii(letter.account_user, 300),
        body_size=len(delivery.body),
        body_sha256=hashlib.sha256(delivery.body).hexdigest(),
        unreplayable="the archive could not store it whole, only as a minimal record",
    )


def _content_key(delivery: Delivery, headers: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for part in (delivery.routing_key, delivery.user_id or "", delivery.message_id or ""):
        digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
    try:
        digest.update(json.dumps(headers, sort_keys=True, default=str).encode())
    except (TypeError, ValueError, RecursionError):
        digest.update(ascii(headers).encode())
    digest.update(delivery.body)
    return "sha256:" + digest.hexdigest()


def _raw_key(delivery: Delivery, raw_headers: str) -> str:
    digest = hashlib.sha256()
    digest.update(_ascii(delivery.routing_key, 300).encode() + b"\0")
    digest.update(raw_headers.encode() + b"\0")
    digest.update(delivery.body)
    return "sha256:" + digest.hexdigest()


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: object) -> str | None:
    """A header value as column text (None for tables and arrays: they stay in the headers)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return _decoded(value)
    if isinstance(value, str | int | float | bool):
        return str(value)
    return None


def _decoded(value: bytes) -> str:
    """UTF-8 as text; bytes that are not UTF-8 as `\\xNN`."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("utf-8", "backslashreplace")


def _plain(value: object, depth: int = 0) -> object:
    """An AMQP field value as a JSON value: bytes as text (`\\xNN` where not UTF-8), decimals
    and non-finite floats as text, timestamps in ISO 8601, tables and arrays as objects and
    lists down to a bounded depth."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _decoded(bytes(value))
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, list | tuple | Mapping) and depth >= _MAX_DEPTH:
        return f"<nested deeper than {_MAX_DEPTH} levels: not kept>"
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return repr(value)


def _ascii(value: str, limit: int) -> str:
    return value.encode("unicode_escape").decode("ascii")[:limit]
