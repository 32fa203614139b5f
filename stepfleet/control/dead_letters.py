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
from typing import TYPE_CHECKING, Any

import structlog

from stepfleet.broker import Topology
from stepfleet.broker.topology import routing_key
from stepfleet.control.audit import operator_name
from stepfleet.cycle.messages import REPLAY_ID_HEADER, REPLAYED_FOR, from_outbox, is_reserved
from stepfleet.schemas import DeadReason, Headers, MessageKind
from stepfleet.store import AuditEntry, DeadLetter, LetterFilter, OutboxMessage, PgStore

if TYPE_CHECKING:  # aio-pika: imported by whoever passes a connected broker
    from stepfleet.broker import Broker

log = structlog.get_logger("stepfleet.control")

# Refused by the producer check: its verdict stands; the producer must publish them again.
UNREPLAYABLE = frozenset(
    {DeadReason.TENANT_MISMATCH, DeadReason.UNVERIFIED_PRODUCER, DeadReason.KIND_NOT_ALLOWED}
)
_CHUNK = 100
_FLEET_KINDS = frozenset({MessageKind.STEP.value, MessageKind.WAKE.value})
_PRODUCER_KINDS = frozenset({MessageKind.CREATE.value, MessageKind.EVENT.value})
_AGAIN = "the producer must publish it again itself"


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a replay goes: the internal exchange for a fleet message, else ingress as a
    message of `producer`, which the workers' producer check then checks again."""

    exchange: str
    producer: str | None = None


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
        routes: dict[int, _Route] = {}
        for letter in selected:
            route = self._route(letter, producers)
            if isinstance(route, str):
                outcome.skipped[letter.id] = route
                log.info(
                    "dead_letter_not_replayed",
                    letter=letter.id,
                    tenant=letter.tenant,
                    instance=letter.instance_id,
                    why=route,
                )
            else:
                routes[letter.id] = route
        replayable = [letter.id for letter in selected if letter.id not in outcome.skipped]
        for start in range(0, len(replayable), _CHUNK):
            chunk = replayable[start : start + _CHUNK]
            async with self._store.control() as tx:
                claimed = await tx.claim_letters(chunk, self.actor)
                rows = [self._outbox_row(letter, routes[letter.id]) for letter in claimed]
                ids = await tx.add_outbox(rows)
                moving = await tx.clear_stalls([letter.id for letter in claimed])
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
            for key in moving:
                log.info("instance_unstalled", tenant=key.tenant, instance=key.instance_id)
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

    def _route(self, letter: DeadLetter, producers: dict[str, str]) -> _Route | str:
        """Where the letter may be replayed, or why it may not: the producer check again.

        Only what the archive recorded from the broker counts (the exchange the message was
        first published to, the user that published it), never a header: a letter is replayed
        to the internal exchange only if it came from there, and any other is replayed to
        ingress as its producer's message, for that producer's own tenant, and is checked
        again as such by the worker that takes it (`x-replayed-for`).
        """
        if letter.reason in UNREPLAYABLE:
            return f"refused by the producer check ({letter.reason}): {_AGAIN}"
        if letter.unreplayable:
            return letter.unreplayable
        if letter.body_truncated:
            return "the archive did not keep its whole body"
        if letter.source == "legacy":
            return (
                "archived before stepfleet recorded who sent a letter, so its sender cannot be "
                f"established: {_AGAIN}"
            )
        kind = letter.kind
        if letter.first_exchange == self._topology.internal_exchange:
            if kind not in _FLEET_KINDS:
                return f"a {kind!r} message from the internal exchange (kind-not-allowed)"
            return self._keyed(letter, kind) or _Route(self._topology.internal_exchange)
        if letter.first_exchange not in (None, self._topology.ingress_exchange):
            return f"first published to {letter.first_exchange!r}, not this fleet's ingress"
        sender = letter.sender
        if not sender:
            return f"the broker does not vouch for who sent it: {_AGAIN}"
        if kind not in _PRODUCER_KINDS:
            return f"producers may publish create and event, not {kind!r} (kind-not-allowed)"
        if sender not in self._trusted and producers.get(sender) != letter.tenant:
            return (
                f"sent by broker user {sender!r}, which is not tenant {letter.tenant!r}'s "
                f"producer: {_AGAIN}"
            )
        return self._keyed(letter, kind) or _Route(self._topology.ingress_exchange, sender)

    def _keyed(self, letter: DeadLetter, kind: str) -> str | None:
        """Why the letter's routing key rules it out: workers refuse a message whose key is
        not `<tenant>.<kind>` of its headers, and the lanes route no other key (RabbitMQ
        would refuse the publish, and the outbox row would be stuck)."""
        expected = routing_key(letter.tenant or "", MessageKind(kind))
        if letter.routing_key == expected:
            return None
        return f"its routing key {letter.routing_key!r} is not {expected!r} (bad-header)"

    def _outbox_row(self, letter: DeadLetter, route: _Route) -> OutboxMessage:
        headers: dict[str, Any] = {
            key: value for key, value in letter.headers.items() if not is_reserved(key)
        }
        if letter.message_id:
            headers[REPLAY_ID_HEADER] = letter.message_id
        if route.producer is not None:
            headers[REPLAYED_FOR] = route.producer
        headers.setdefault(Headers.TENANT, letter.tenant or "")
        return OutboxMessage(
            routing_key=letter.routing_key,
            headers=json.dumps(headers),
            body=letter.body,
            exchange=route.exchange,
        )

    async def _publish(self, ids: Sequence[int], rows: Sequence[OutboxMessage]) -> None:
        """Publish what the replay queued; if that fails, the outbox relay does it later."""
        if not rows or self._broker is None:
            return
        await self._broker.publish_many(
            [from_outbox(self._topology, row, user_id=self._user_id) for row in rows]
        )
        await self._store.delete_outbox(ids)
