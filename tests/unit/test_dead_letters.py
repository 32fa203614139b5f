"""Dead letters without services: what a worker's dead letter carries, who the producer
check lets through, and what the archive keeps of a letter (docs/protocol.md, *Dead letters*)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from stepfleet.broker import Delivery, Topology
from stepfleet.cycle.directory import TenantDirectory
from stepfleet.cycle.messages import (
    MOVED_EXCHANGE,
    MOVED_KEY,
    MOVED_USER,
    REPLAYED_FOR,
    dead_letter,
)
from stepfleet.engine import EngineLimits
from stepfleet.schemas import DeadReason, TenantLimits, parse_envelope
from stepfleet.store import Archived, NewDeadLetter, StoreUnavailable, TenantRecord
from stepfleet.store.dead_letters import storable_text
from stepfleet.workers import archive as archive_module
from stepfleet.workers.archive import DeadLetterArchiver
from stepfleet.workers.dead_letter_records import TRUNCATED_BODY_BYTES, ArchivePolicy, letter_of
from stepfleet.workers.tenants import ProducerCheck

TOPOLOGY = Topology()
FLEET = "stepfleet-fleet"
ALICE = "stepfleet.tenant.alice"
MALLORY = "stepfleet.tenant.mallory"


async def _nothing() -> None:
    return None


def delivery(
    headers: Mapping[str, Any],
    body: bytes = b"{}",
    *,
    user_id: str | None = None,
    exchange: str = TOPOLOGY.ingress_exchange,
    routing_key: str = "alice.event",
) -> Delivery:
    return Delivery(
        body=body,
        headers=dict(headers),
        routing_key=routing_key,
        exchange=exchange,
        message_id="m-1",
        user_id=user_id,
        redelivered=False,
        delivery_count=0,
        _ack=_nothing,
        _release=_nothing,
    )


def event_headers(tenant: str = "alice", **extra: Any) -> dict[str, Any]:
    return {
        "x-tenant": tenant,
        "x-instance-id": "inst-1",
        "x-kind": "event",
        "x-schema-version": "1",
        **extra,
    }


EVENT_BODY = b'{"event_id":"e1","type":"go"}'


def test_a_worker_dead_letter_drops_what_a_producer_forged_and_keeps_what_the_broker_said():
    """Reserved headers a producer sent (x-original-*, x-death, x-dead-*, x-replayed-for) are
    not copied: only the worker writes them, from the delivery's broker-set properties."""
    forged = event_headers(
        "bob",
        **{
            "x-original-user-id": "stepfleet.tenant.bob",
            "x-original-exchange": TOPOLOGY.internal_exchange,
            "x-dead-letter-id": "forged",
            "x-death": [{"queue": "q", "reason": "expired", "exchange": "x"}],
            "x-first-death-exchange": TOPOLOGY.internal_exchange,
            REPLAYED_FOR: "stepfleet.tenant.bob",
            "CC": ["bob.create"],
            "BCC": ["bob.event"],
            "x-custom": "kept",
        },
    )
    letter = dead_letter(
        TOPOLOGY, delivery(forged, user_id=MALLORY), DeadReason.TENANT_MISMATCH, "publishes for bob"
    )
    headers = dict(letter.headers)
    # The wire carries the reason as plain text.
    assert type(headers["x-dead-reason"]) is str
    assert headers["x-dead-reason"] == "tenant-mismatch"
    assert headers["x-original-user-id"] == MALLORY
    assert headers["x-original-exchange"] == TOPOLOGY.ingress_exchange
    assert headers["x-dead-letter-id"] != "forged"
    assert headers["x-custom"] == "kept"
    # CC and BCC would add routing keys to the fleet's own publish (of the letter, of a replay).
    for name in ("x-death", "x-first-death-exchange", REPLAYED_FOR, "CC", "BCC"):
        assert name not in headers, name
    # Recorded as the delivery carried it; the archive believes it only when the delivery's
    # verified user was the fleet's (test_the_archive_believes_only_what_the_broker_vouches_for).
    assert headers["x-original-replayed-for"] == "stepfleet.tenant.bob"
    assert letter.exchange == TOPOLOGY.dead_letter_exchange
    assert letter.user_id is None  # the broker names the fleet's own user


def test_a_dead_letter_of_a_replay_names_the_producer_it_was_replayed_for():
    replayed = delivery(event_headers(**{REPLAYED_FOR: ALICE}), user_id=FLEET)
    headers = dict(
        dead_letter(TOPOLOGY, replayed, DeadReason.UNKNOWN_INSTANCE, "no such instance").headers
    )
    assert headers["x-original-user-id"] == FLEET
    assert headers["x-original-replayed-for"] == ALICE
    assert REPLAYED_FOR not in headers


def producer_check() -> ProducerCheck:
    directory = TenantDirectory(EngineLimits())
    directory.load(
        [
            TenantRecord("alice", ALICE, TenantLimits()),
            TenantRecord("mallory", MALLORY, TenantLimits()),
        ]
    )
    return ProducerCheck(TOPOLOGY, directory, frozenset({FLEET, "platform"}), fleet_user=FLEET)


async def test_the_fleet_and_platform_users_never_reload_the_tenant_directory():
    """Their messages are no miss: only an unknown producer user reloads the tenants."""
    loads: list[int] = []

    class Rows:
        async def all(self) -> list[TenantRecord]:
            loads.append(1)
            return [TenantRecord("alice", ALICE, TenantLimits())]

    directory = TenantDirectory(EngineLimits())
    check = ProducerCheck(
        TOPOLOGY, directory, frozenset({FLEET, "platform"}), fleet_user=FLEET, rows=Rows()
    )
    await check.refresh_on_miss({FLEET, "platform"})
    assert loads == []
    await check.refresh_on_miss({FLEET, ALICE})
    assert loads == [1]


@pytest.mark.parametrize(
    ("user_id", "headers", "reason"),
    [
        # A replay for alice's own producer, of alice's own message: as if alice sent it.
        (FLEET, event_headers(**{REPLAYED_FOR: ALICE}), None),
        # A replay for mallory's producer of a message naming alice: refused like mallory.
        (FLEET, event_headers(**{REPLAYED_FOR: MALLORY}), "tenant-mismatch"),
        (FLEET, event_headers(**{REPLAYED_FOR: b"stepfleet.tenant.mallory"}), "tenant-mismatch"),
        (FLEET, event_headers(**{REPLAYED_FOR: "gone"}), "unverified-producer"),
        (FLEET, event_headers(**{REPLAYED_FOR: ""}), "unverified-producer"),
        (FLEET, event_headers(**{REPLAYED_FOR: "platform"}), None),
        # The fleet publishing for itself (stepfleet event) is a platform user.
        (FLEET, event_headers(), None),
        # From anyone but the fleet the header means nothing: the user itself is checked.
        (MALLORY, event_headers(**{REPLAYED_FOR: ALICE}), "tenant-mismatch"),
        (ALICE, event_headers(**{REPLAYED_FOR: MALLORY}), None),
        ("platform", event_headers(**{REPLAYED_FOR: MALLORY}), None),
        (None, event_headers(**{REPLAYED_FOR: ALICE}), "unverified-producer"),
    ],
)
def test_a_replay_is_checked_as_its_original_producer(user_id, headers, reason):
    message = delivery(headers, EVENT_BODY, user_id=user_id)
    envelope = parse_envelope(message.headers, message.body, max_body_bytes=1 << 20)
    refusal = producer_check().check(message, envelope)
    assert (refusal and refusal.reason) == reason


def test_a_replayed_fleet_kind_through_ingress_is_refused():
    """A replay goes to the internal exchange only for a letter that came from it; a wake
    replayed to ingress meets the producer check's kind rule."""
    headers = {**event_headers(), "x-kind": "wake", REPLAYED_FOR: ALICE}
    body = b'{"position":0,"attempt":1}'
    message = delivery(headers, body, user_id=FLEET)
    envelope = parse_envelope(message.headers, message.body, max_body_bytes=1 << 20)
    refusal = producer_check().check(message, envelope)
    assert refusal is not None
    assert refusal.reason is DeadReason.KIND_NOT_ALLOWED


# -- what the archive keeps ---------------------------------------------------------------


POLICY = ArchivePolicy(
    topology=TOPOLOGY,
    fleet_user=FLEET,
    trusted_users=frozenset({FLEET, "platform"}),
    max_body_bytes=2048,
    account_bytes=None,
)


def rabbitmq_death(queue: str, exchange: str, reason: str = "expired") -> dict[str, Any]:
    return {"queue": queue, "reason": reason, "exchange": exchange, "count": 1}


def test_the_archive_believes_only_what_the_broker_vouches_for():
    """The sender of a letter RabbitMQ dead-lettered is its user_id, whatever x-original-*,
    x-death or x-first-death-* headers its producer sent along (RabbitMQ builds on a forged
    x-death instead of replacing it); only the fleet's own letters are read for more."""
    lane = TOPOLOGY.work_queues[3]
    forged = event_headers(
        "bob",
        **{
            "x-original-user-id": "stepfleet.tenant.bob",
            "x-original-exchange": TOPOLOGY.internal_exchange,
            "x-original-replayed-for": "stepfleet.tenant.bob",
            "x-dead-reason": "unknown-instance",
            "x-dead-letter-id": "chosen-key",
            "x-death": [rabbitmq_death(lane, TOPOLOGY.internal_exchange)],
            "x-first-death-exchange": TOPOLOGY.internal_exchange,
            "x-kind": "wake",
        },
    )
    expired = letter_of(
        delivery(forged, user_id=MALLORY, exchange=TOPOLOGY.dead_letter_exchange), POLICY
    )
    assert (expired.source, expired.reason) == ("rabbitmq", "expired")
    assert expired.sender == MALLORY
    assert expired.first_exchange is None
    assert expired.letter_key != "chosen-key"
    assert expired.account_user == MALLORY  # counts against mallory's archive, not bob's
    assert expired.account is None

    anonymous = letter_of(delivery(forged, exchange=TOPOLOGY.dead_letter_exchange), POLICY)
    assert anonymous.sender is None

    # The same headers published straight to the dead-letter exchange by someone else.
    direct = letter_of(delivery({**forged, "x-death": None}, user_id="platform"), POLICY)
    assert (direct.source, direct.sender, direct.first_exchange) == ("other", None, None)


def test_the_fleets_own_letters_say_who_sent_the_original():
    worker = dead_letter(
        TOPOLOGY,
        delivery(event_headers(), user_id=ALICE),
        DeadReason.UNKNOWN_INSTANCE,
        "no instance",
    )
    letter = letter_of(
        delivery(worker.headers, user_id=FLEET, exchange=TOPOLOGY.dead_letter_exchange), POLICY
    )
    assert (letter.source, letter.reason) == ("worker", "unknown-instance")
    assert (letter.sender, letter.first_exchange) == (ALICE, TOPOLOGY.ingress_exchange)
    assert letter.letter_key == worker.headers["x-dead-letter-id"]

    replay = dead_letter(
        TOPOLOGY,
        delivery(event_headers(**{REPLAYED_FOR: ALICE}), user_id=FLEET),
        DeadReason.UNKNOWN_INSTANCE,
        "still no instance",
    )
    replayed = letter_of(delivery(replay.headers, user_id=FLEET), POLICY)
    assert replayed.sender == ALICE

    # A step of the fleet's that RabbitMQ gave up on: its x-death is RabbitMQ's alone.
    step = {
        **event_headers(),
        "x-kind": "step",
        "x-death": [rabbitmq_death(TOPOLOGY.work_queues[0], TOPOLOGY.internal_exchange,
                                   "delivery_limit")],
        "x-first-death-exchange": TOPOLOGY.internal_exchange,
    }  # fmt: skip
    crashed = letter_of(delivery(step, user_id=FLEET), POLICY)
    assert (crashed.source, crashed.reason) == ("rabbitmq", "delivery-limit")
    assert crashed.first_exchange == TOPOLOGY.internal_exchange
    assert crashed.account == "alice"

    # A producer's create a worker moved to a side lane, which RabbitMQ then gave up on: it
    # is the producer's create again, as it was in its lane.
    moved = {
        **event_headers(),
        "x-kind": "create",
        MOVED_KEY: "alice.create",
        MOVED_EXCHANGE: TOPOLOGY.ingress_exchange,
        MOVED_USER: ALICE,
        "x-death": [rabbitmq_death(TOPOLOGY.side_queues[3], TOPOLOGY.side_exchange,
                                   "delivery_limit")],
        "x-first-death-exchange": TOPOLOGY.side_exchange,
    }  # fmt: skip
    side = letter_of(delivery(moved, user_id=FLEET, routing_key="3"), POLICY)
    assert (side.source, side.reason) == ("rabbitmq", "delivery-limit")
    assert (side.sender, side.first_exchange) == (ALICE, TOPOLOGY.ingress_exchange)
    assert side.routing_key == "alice.create"


def test_any_header_value_becomes_json_and_any_text_becomes_storable():
    """Headers may hold any AMQP field value; the letter's headers are JSON values and every
    text column is text PostgreSQL takes (NUL and unpaired surrogates escaped, clipped)."""
    nested: dict[str, Any] = {"leaf": 1}
    for _ in range(100):
        nested = {"n": nested}
    headers = {
        "x-tenant": "t\x00" + "x" * 10_000,
        "x-instance-id": b"\xff\xfe\x00",
        "x-module": "\ud800",
        "x-kind": Decimal("1.5"),
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "blob": bytearray(b"\x00\x01"),
        "nan": float("nan"),
        "deep": nested,
        "list": [b"a", {"b": b"\x80"}],
    }
    letter = letter_of(delivery(headers, b"\x00\xff", user_id=None), POLICY)
    text = json.dumps(letter.headers, allow_nan=False)
    assert json.loads(text)["x-instance-id"] == "\\xff\\xfe\x00"
    assert letter.headers["when"] == "2026-01-01T00:00:00+00:00"
    assert "nested deeper than" in json.dumps(letter.headers["deep"])
    for value in (letter.tenant, letter.instance_id, letter.module, letter.kind):
        assert value is not None
        stored = storable_text(value, 512)
        assert "\x00" not in stored
        assert len(stored) <= 512
        stored.encode("utf-8")  # no unpaired surrogate left
    assert letter.body == b"\x00\xff"


def test_a_body_over_the_size_limit_keeps_a_prefix_its_size_and_its_hash():
    body = bytes(range(256)) * 40
    letter = letter_of(delivery(event_headers(), body, user_id=ALICE), POLICY)
    assert letter.body == body[:TRUNCATED_BODY_BYTES]
    assert letter.body_size == len(body)
    assert letter.body_sha256 == hashlib.sha256(body).hexdigest()
    assert letter.unreplayable is not None
    assert "over the fleet's limit of 2048" in letter.unreplayable
    whole = letter_of(delivery(event_headers(), body[:2048], user_id=ALICE), POLICY)
    assert (whole.body, whole.unreplayable) == (body[:2048], None)


# -- the archiver, over a store that refuses some letters ------------------------------------


class Refusing:
    """A dead-letter store that refuses letters naming a poisoned tenant (and, with
    `minimal_too`, their minimal records), as PostgreSQL refuses text it cannot hold."""

    def __init__(self, *, minimal_too: bool = False, down: bool = False) -> None:
        self.minimal_too = minimal_too
        self.down = down
        self.stored: list[NewDeadLetter] = []

    async def archive(self, letters, *, account_bytes=None, stalls=None):
        if self.down:
            raise StoreUnavailable("PostgreSQL is down")
        for letter in letters:
            poisoned = "poison" in (letter.tenant or "")
            if poisoned and (self.minimal_too or "x-stepfleet-raw-headers" not in letter.headers):
                raise ValueError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        self.stored.extend(letters)
        return Archived(new=len(letters))


class Tracked:
    def __init__(self, delivery_: Delivery) -> None:
        self.delivery = delivery_
        self.acked = self.released = False

        async def ack() -> None:
            self.acked = True

        async def release() -> None:
            self.released = True

        delivery_._ack = ack
        delivery_._release = release


def archiver_over(dead_letters: Refusing) -> DeadLetterArchiver:
    store = SimpleNamespace(dead_letters=dead_letters)
    return DeadLetterArchiver(store, POLICY)  # type: ignore[arg-type]


def batch_of(*tenants: str) -> list[Tracked]:
    return [Tracked(delivery(event_headers(t), user_id=ALICE)) for t in tenants]


async def test_one_letter_the_database_refuses_holds_up_no_other(monkeypatch):
    """The batch fails, the letters are archived one by one, and the refused one is kept as a
    minimal record (its headers as ASCII, its body as bytes): every letter is acked."""
    monkeypatch.setattr(archive_module, "_RETRY_SECONDS", 0)
    store = Refusing()
    archiver = archiver_over(store)
    batch = batch_of("alice", "poison", "bob")
    await archiver._archive([t.delivery for t in batch])
    assert [t.acked for t in batch] == [True, True, True]
    assert [letter.tenant for letter in store.stored] == ["alice", "poison", "bob"]
    minimal = store.stored[1]
    assert minimal.unreplayable is not None
    assert "minimal record" in minimal.detail
    assert archiver.minimal == 1


async def test_a_letter_that_cannot_be_stored_at_all_is_held_not_lost(monkeypatch):
    """Neither acked nor handed straight back (it would come round again at once): held for
    a while, then handed back to the queue; the others are archived meanwhile."""
    monkeypatch.setattr(archive_module, "_RETRY_SECONDS", 0)
    monkeypatch.setattr(archive_module, "_HOLD_SECONDS", 0)
    store = Refusing(minimal_too=True)
    archiver = archiver_over(store)
    batch = batch_of("alice", "poison", "bob")
    await archiver._archive([t.delivery for t in batch])
    assert [(t.acked, t.released) for t in batch] == [(True, False), (False, False), (True, False)]
    assert [letter.tenant for letter in store.stored] == ["alice", "bob"]
    await asyncio.gather(*archiver._held)
    assert (batch[1].acked, batch[1].released) == (False, True)


async def test_a_database_that_is_down_gets_the_whole_batch_back_later(monkeypatch):
    monkeypatch.setattr(archive_module, "_RETRY_SECONDS", 0)
    batch = batch_of("alice", "bob")
    await archiver_over(Refusing(down=True))._archive([t.delivery for t in batch])
    assert [(t.acked, t.released) for t in batch] == [(False, True), (False, True)]
