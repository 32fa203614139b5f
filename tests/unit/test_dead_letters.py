"""Dead letters without services: what a worker's dead letter carries, who the producer
check lets through, and what the archive keeps of a letter (docs/protocol.md, *Dead letters*)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from stepfleet.broker import Delivery, Topology
from stepfleet.engine import EngineLimits
from stepfleet.schemas import TenantLimits, parse_envelope
from stepfleet.store import TenantRecord
from stepfleet.workers.outgoing import REPLAYED_FOR, dead_letter
from stepfleet.workers.tenants import ProducerCheck, TenantDirectory

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
            "x-custom": "kept",
        },
    )
    letter = dead_letter(
        TOPOLOGY, delivery(forged, user_id=MALLORY), "tenant-mismatch", "publishes for bob"
    )
    headers = dict(letter.headers)
    assert headers["x-original-user-id"] == MALLORY
    assert headers["x-original-exchange"] == TOPOLOGY.ingress_exchange
    assert headers["x-dead-letter-id"] != "forged"
    assert headers["x-custom"] == "kept"
    for name in ("x-death", "x-first-death-exchange", REPLAYED_FOR):
        assert name not in headers, name
    # Recorded as the delivery carried it; the archive believes it only when the delivery's
    # verified user was the fleet's (test_the_archive_believes_only_what_the_broker_vouches_for).
    assert headers["x-original-replayed-for"] == "stepfleet.tenant.bob"
    assert letter.exchange == TOPOLOGY.dead_letter_exchange
    assert letter.user_id is None  # the broker names the fleet's own user


def test_a_dead_letter_of_a_replay_names_the_producer_it_was_replayed_for():
    replayed = delivery(event_headers(**{REPLAYED_FOR: ALICE}), user_id=FLEET)
    headers = dict(dead_letter(TOPOLOGY, replayed, "unknown-instance", "no such instance").headers)
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
    assert refusal.reason == "kind-not-allowed"
