"""Operator actions on archived dead letters: replay and purge, with the audit log.

A replay marks the letters replayed and queues them in the outbox in one transaction, then
publishes them with confirms and forgets the outbox rows; a replay interrupted after its
commit is finished by any worker's outbox relay. A letter already replayed is never
published again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from stepfleet.broker import Broker, Topology
from stepfleet.control.audit import operator_name
from stepfleet.schemas import Headers, MessageKind
from stepfleet.store import AuditEntry, DeadLetter, LetterFilter, OutboxMessage, PgStore
from stepfleet.workers.outgoing import DEAD_LETTER_ID, REPLAY_ID_HEADER, from_outbox

log = structlog.get_logger("stepfleet.control")

# Refused by the producer check: replaying them as the operator would bypass it; the
# producer must publish them again itself.
UNREPLAYABLE = frozenset({"tenant-mismatch", "unverified-producer", "kind-not-allowed"})
_CHUNK = 100
_DROPPED_HEADER_PREFIXES = ("x-dead-", "x-original-", "x-first-death-", "x-last-death-")
_DROPPED_HEADERS = frozenset({"x-death", "x-delivery-count", DEAD_LETTER_ID})


@dataclass(slots=True)
class Outcome:
    """What a bulk action did: the letters it acted on, and why others were left alone."""

    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


class DeadLetters:
    """Replay and purge archived dead letters."""

    def __init__(
        self,
        store: PgStore,
        broker: Broker | None,
        topology: Topology,
        *,
        user_id: str,
        trusted_users: frozenset[str] = frozenset(),
        actor: str | None = None,
    ) -> None:
        self._store = store
        self._broker = broker
        self._topology = topology
        self._user_id = user_id
        self._trusted = trusted_users | {user_id}
        self.actor = actor or operator_name()

    async def replay(
        self, letters: LetterFilter, *, progress: Callable[[int], None] | None = None
    ) -> Outcome:
        """Publish the selected letters again, each once, to the exchange they came through."""
        outcome = Outcome()
        selected = await self._store.dead_letters.find(letters)
        producers = {
            t.broker_user: t.name for t in await self._store.tenants.all() if t.broker_user
        }
        for letter in selected:
            why = self._unreplayable(letter, producers)
            if why is not None:
                outcome.skipped[letter.id] = why
        replayable = [letter.id for letter in selected if letter.id not in outcome.skipped]
        for start in range(0, len(replayable), _CHUNK):
            chunk = replayable[start : start + _CHUNK]
            async with self._store.control() as tx:
                claimed = await tx.claim_letters(chunk, self.actor)
                rows = [self._outbox_row(letter) for letter in claimed]
                ids = await tx.add_outbox(rows)
                if claimed:
                    await tx.audit(
                        AuditEntry(
                            self.actor,
                            "dlq-replay",
                            ",".join(str(letter.id) for letter in claimed),
                            filter=letters.describe(),
                            count=len(claimed),
                        )
                    )
            for letter_id in set(chunk) - {letter.id for letter in claimed}:
                outcome.skipped[letter_id] = "already replayed"
            await self._publish(ids, rows)
            outcome.done.extend(letter.id for letter in claimed)
            if progress:
                progress(len(chunk))
        log.info("dead_letters_replayed", count=len(outcome.done), actor=self.actor)
        return outcome

    async def purge(
        self, letters: LetterFilter, *, progress: Callable[[int], None] | None = None
    ) -> Outcome:
        """Delete the selected letters from the archive for good."""
        outcome = Outcome()
        selected = [letter.id for letter in await self._store.dead_letters.find(letters)]
        for start in range(0, len(selected), _CHUNK):
            chunk = selected[start : start + _CHUNK]
            async with self._store.control() as tx:
                deleted = await tx.purge_letters(chunk)
                await tx.audit(
                    AuditEntry(
                        self.actor,
                        "dlq-purge",
                        ",".join(str(i) for i in chunk),
                        filter=letters.describe(),
                        count=deleted,
                    )
                )
            outcome.done.extend(chunk)
            if progress:
                progress(len(chunk))
        log.info("dead_letters_purged", count=len(outcome.done), actor=self.actor)
        return outcome

    def _unreplayable(self, letter: DeadLetter, producers: dict[str, str]) -> str | None:
        """Why replaying a letter as the operator would bypass the producer check, if it would.

        A replay is published as the fleet's user, which may act for any tenant; so a letter a
        tenant's producer sent is replayed only for that producer's own tenant.
        """
        if letter.reason in UNREPLAYABLE:
            return (
                f"refused by the producer check ({letter.reason}): the producer must publish "
                "it again itself"
            )
        if letter.unreplayable:
            return letter.unreplayable  # its body was cut or dropped: the archiver said why
        sender = letter.headers.get("x-original-user-id")
        if letter.kind in (MessageKind.STEP.value, MessageKind.WAKE.value):
            return None  # the fleet's own messages
        if not sender:
            return "the letter does not say who sent it: the producer must publish it again"
        if sender not in self._trusted and producers.get(str(sender)) != letter.tenant:
            return (
                f"sent by broker user {sender!r}, which is not tenant {letter.tenant!r}'s "
                "producer: the producer must publish it again itself"
            )
        return None

    def _outbox_row(self, letter: DeadLetter) -> OutboxMessage:
        headers: dict[str, Any] = {
            key: value
            for key, value in letter.headers.items()
            if key not in _DROPPED_HEADERS and not key.startswith(_DROPPED_HEADER_PREFIXES)
        }
        if letter.message_id:
            headers[REPLAY_ID_HEADER] = letter.message_id
        internal = letter.kind in (MessageKind.STEP.value, MessageKind.WAKE.value)
        exchange = self._topology.internal_exchange if internal else self._topology.ingress_exchange
        headers.setdefault(Headers.TENANT, letter.tenant or "")
        return OutboxMessage(
            routing_key=letter.routing_key,
            headers=json.dumps(headers),
            body=letter.body,
            exchange=exchange,
        )

    async def _publish(self, ids: Sequence[int], rows: Sequence[OutboxMessage]) -> None:
        """Publish what the replay queued; if that fails, the outbox relay does it later."""
        if not rows or self._broker is None:
            return
        await self._broker.publish_many(
            [from_outbox(self._topology, row, user_id=self._user_id) for row in rows]
        )
        await self._store.delete_outbox(ids)
