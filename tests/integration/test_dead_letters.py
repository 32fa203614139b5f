"""The dead-letter archive and the operator tools: every poison message is archived with its
reason and context, can be listed, shown, exported, replayed once and purged, and every
operator action lands in the audit log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid

import aiormq
import pytest
from typer.testing import CliRunner

from stepfleet.broker import Delivery, Outgoing, Topology
from stepfleet.cli.main import app
from stepfleet.client import CreateRequest, Producer
from stepfleet.control import DeadLetters
from stepfleet.cycle.messages import REPLAYED_FOR
from stepfleet.schemas import InstanceKey, InstanceStatus, digest_of
from stepfleet.store import LetterFilter
from stepfleet.workers.dead_letter_records import ArchivePolicy, letter_of
from tests.conftest import ORDER_PARAMS
from tests.integration.conftest import wait_for_status
from tests.integration.test_fleet import archived, dead_letter_of
from tests.integration.test_primitives import finished, output, send_event

pytestmark = pytest.mark.services


@pytest.fixture
def cli(settings):
    env = {
        "STEPFLEET_DATABASE_URL": settings.database_url,
        "STEPFLEET_AMQP_URL": settings.amqp_url,
        "STEPFLEET_PREFIX": settings.prefix,
        "STEPFLEET_OPERATOR": "oncall-ada",
    }
    runner = CliRunner()

    async def invoke(*args: str):
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)

    return invoke


def create_message(topology, tenant: str, instance_id: str, module: str) -> Outgoing:
    headers = {
        "x-tenant": tenant,
        "x-instance-id": instance_id,
        "x-module": module,
        "x-kind": "create",
        "x-schema-version": "1",
    }
    body = json.dumps({"params": ORDER_PARAMS}).encode()
    return Outgoing(
        topology.ingress_exchange, f"{tenant}.create", body, headers, instance_id, "guest"
    )


async def test_a_fixed_cause_lets_an_operator_replay_a_letter_once(
    cli, topology, broker, store, start_worker, order_wasm
):
    """An unknown-module create is archived; after the push, replaying it runs the workflow,
    and replaying it again publishes nothing."""
    tenant = f"dlq{uuid.uuid4().hex[:8]}"
    digest = digest_of(order_wasm)
    await start_worker()
    instance_id = f"late-{uuid.uuid4().hex[:8]}"
    await broker.publish_many([create_message(topology, tenant, instance_id, digest)])
    letter = await dead_letter_of(store, instance_id)
    assert letter.reason == "unknown-module"
    assert letter.tenant == tenant
    assert json.loads(letter.body) == {"params": ORDER_PARAMS}

    listed = await cli("dlq", "list", "--tenant", tenant, "--json")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [letter.id]
    shown = json.loads((await cli("dlq", "show", str(letter.id))).stdout)
    assert shown["headers"]["x-dead-reason"] == "unknown-module"
    assert shown["body"] == {"params": ORDER_PARAMS}

    await store.put_module(tenant, digest, order_wasm)
    first = await cli("dlq", "replay", str(letter.id))
    assert first.exit_code == 0, first.output
    assert "1 letter(s) replayed" in first.stdout
    record, _ = await wait_for_status(
        store, InstanceKey(tenant, instance_id), {InstanceStatus.COMPLETE}
    )
    assert record.status is InstanceStatus.COMPLETE
    again = await cli("dlq", "replay", str(letter.id))
    assert "0 letter(s) replayed" in again.stdout
    assert "already replayed" in again.output
    [marked] = await store.dead_letters.find(LetterFilter(ids=(letter.id,), include_replayed=True))
    assert marked.replayed_by == "oncall-ada"
    entries = await store.dead_letters.audit_entries(action="dlq-replay")
    assert entries[0].actor == "oncall-ada"
    assert entries[0].target == str(letter.id)
    missing = await cli("dlq", "show", "999999999")
    assert missing.exit_code == 1
    assert "no dead letter 999999999" in missing.output


async def test_authorization_refusals_are_not_replayed_as_the_operator(
    topology, broker, raw, store, start_worker, settings, order_wasm
):
    await start_worker()
    instance_id = f"anon-{uuid.uuid4().hex[:8]}"
    message = create_message(topology, "acme", instance_id, digest_of(order_wasm))
    # A bare client: the fleet's own Broker names its user on every message.
    await raw.channel.basic_publish(
        message.body,
        exchange=message.exchange,
        routing_key=message.routing_key,
        properties=aiormq.spec.Basic.Properties(delivery_mode=2, headers=dict(message.headers)),
    )
    letter = await dead_letter_of(store, instance_id)
    assert letter.reason == "unverified-producer"
    letters = DeadLetters(store, broker, topology, user_id="guest", actor="test")
    outcome = await letters.replay(LetterFilter(ids=(letter.id,)))
    assert outcome.done == []
    assert "producer check" in outcome.skipped[letter.id]


async def test_a_letter_is_replayed_only_under_its_own_routing_key(
    cli, topology, broker, store, start_worker
):
    """Workers refuse a message whose routing key is not `<tenant>.<kind>` of its headers,
    and the lanes route no other key: such a letter is not replayed (nothing is published that
    RabbitMQ would refuse and leave stuck in the outbox)."""
    await start_worker()
    tenant, elsewhere = f"key{uuid.uuid4().hex[:8]}", f"other{uuid.uuid4().hex[:8]}"
    instance_id = f"keyed-{uuid.uuid4().hex[:8]}"
    headers = {
        "x-tenant": tenant,
        "x-instance-id": instance_id,
        "x-kind": "event",
        "x-schema-version": "1",
    }
    await broker.publish_many(
        [
            Outgoing(
                topology.ingress_exchange,
                f"{elsewhere}.event",
                b'{"event_id":"e1","type":"go"}',
                headers,
            )
        ]
    )
    letter = await dead_letter_of(store, instance_id)
    replay = await cli("dlq", "replay", str(letter.id))
    assert replay.exit_code == 0, replay.output
    assert "0 letter(s) replayed" in replay.stdout
    assert f"its routing key '{elsewhere}.event' is not '{tenant}.event'" in replay.output


async def test_purge_asks_first_and_is_audited(
    cli, settings, topology, broker, store, start_worker
):
    await start_worker()
    tenant = f"purge{uuid.uuid4().hex[:8]}"
    ids = [f"junk-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    await broker.publish_many(
        [
            Outgoing(
                topology.ingress_exchange,
                f"{tenant}.create",
                b"{not json",
                {"x-tenant": tenant, "x-instance-id": i, "x-kind": "create",
                 "x-schema-version": "1", "x-module": "sha256:" + "a" * 64},
                user_id="guest",
            )
            for i in ids
        ]
    )  # fmt: skip
    await archived(store, ids)
    runner_input = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["dlq", "purge", "--tenant", tenant],
        input="n\n",
        env={
            "STEPFLEET_DATABASE_URL": settings.database_url,
            "STEPFLEET_AMQP_URL": settings.amqp_url,
            "STEPFLEET_PREFIX": settings.prefix,
        },
    )
    assert runner_input.exit_code == 1  # declined: nothing purged
    assert len(await store.dead_letters.find(LetterFilter(tenant=tenant))) == 3
    exported = await cli("dlq", "export", "--tenant", tenant)
    assert len(exported.stdout.splitlines()) == 3
    purged = await cli("dlq", "purge", "--tenant", tenant, "--reason", "bad-body", "--yes")
    assert "3 letter(s) purged" in purged.stdout
    assert await store.dead_letters.find(LetterFilter(tenant=tenant, include_replayed=True)) == []
    [entry] = await store.dead_letters.audit_entries(action="dlq-purge", limit=1)
    assert entry.count == 3
    assert entry.filter == {"tenant": tenant, "reason": "bad-body"}
    log = await cli("audit", "--json", "--action", "dlq-purge")
    assert json.loads(log.stdout.splitlines()[0])["actor"] == "oncall-ada"


async def test_failed_instances_are_retried_from_the_failed_step(
    cli, store, start_worker, playbook
):
    """An instance whose step failed for good runs again from that step, its attempt count
    going on; the retry is audited."""
    await start_worker()
    key = await playbook(
        {"op": "do", "name": "first"},
        {"op": "do", "name": "flaky", "fail_times": 1, "non_retryable": True, "propagate": True},
    )
    failed = await finished(store, key)
    assert failed.record.status is InstanceStatus.ERRORED
    retried = await cli("retry", key.instance_id, "--tenant", key.tenant)
    assert retried.exit_code == 0, retried.output
    await wait_for_status(store, key, {InstanceStatus.COMPLETE})
    detail = await store.detail(key)
    assert detail is not None
    assert [(e.name, e.attempt) for e in detail.journal] == [("first", 1), ("flaky", 2)]
    assert detail.journal[0].started_at == failed.journal[0].started_at  # kept
    assert [(a.name, a.attempt, a.error) for a in detail.attempts] == [
        ("flaky", 1, "attempt 1 failed")
    ]
    [entry] = await store.dead_letters.audit_entries(action="retry", limit=1)
    assert entry.target == f"{key.tenant}/{key.instance_id}"


# -- who sent a letter -------------------------------------------------------------------


async def stopped(worker) -> None:
    """Stop a worker and wait until it consumes nothing any more."""
    worker.stop()
    deadline = asyncio.get_running_loop().time() + 30
    while worker.health.state != "stopped":
        assert asyncio.get_running_loop().time() < deadline, "the worker did not stop"
        await asyncio.sleep(0.05)


async def lanes_drained(channel, topology) -> None:
    """Wait until every lane is empty (RabbitMQ expired what was in them)."""
    while True:
        counts = [
            (await channel.queue_declare(queue, passive=True)).message_count
            for queue in topology.work_queues
        ]
        if not any(counts):
            return
        await asyncio.sleep(0.1)


async def test_a_producer_cannot_forge_who_sent_an_expired_letter(
    cli, settings, topology, store, raw, start_worker, tenant, connect, playbook_wasm
):
    """Mallory publishes for the victim's tenant with its own user_id, a forged
    x-original-user-id naming the victim's producer and expiration 1: an event for the
    victim's waiting instance and a wake for its sleeping one (under its own routing key, the
    only one it may use). RabbitMQ expires them in a lane no worker consumes and the archive
    keeps them, but a replay of the victim's expired letters publishes neither: the event was
    sent by mallory, and a wake never came from the internal exchange. The victim's instances
    are untouched: the waiting one takes the victim's own event next, the sleeping one still
    sleeps."""
    mallory, mallory_credentials = await tenant()
    victim, victim_credentials = await tenant()
    digest = digest_of(playbook_wasm)
    await store.put_module(victim, digest, playbook_wasm)
    first = await start_worker()
    waiter = InstanceKey(victim, f"waiter-{uuid.uuid4().hex[:8]}")
    sleeper = InstanceKey(victim, f"sleeper-{uuid.uuid4().hex[:8]}")
    async with Producer(settings.amqp_url, topology) as producer:
        for key, op in (
            (waiter, {"op": "wait", "name": "w", "type": "go"}),
            (sleeper, {"op": "sleep", "name": "nap", "ms": 3_600_000}),
        ):
            await producer.create(CreateRequest(victim, digest, {"ops": [op]}, key.instance_id))
    await wait_for_status(store, waiter, {InstanceStatus.WAITING})
    asleep, _ = await wait_for_status(store, sleeper, {InstanceStatus.SLEEPING})
    await stopped(first)

    channel = await connect(mallory_credentials)
    forged = {
        "x-tenant": victim,
        "x-schema-version": "1",
        "x-original-user-id": victim_credentials.user,
        "x-original-exchange": topology.internal_exchange,
    }
    for kind, key, body in (
        ("event", waiter, {"event_id": "evil", "type": "go", "payload": {"from": "mallory"}}),
        ("wake", sleeper, {"position": asleep.position, "attempt": asleep.attempt}),
    ):
        confirmation = await channel.basic_publish(
            json.dumps(body).encode(),
            exchange=topology.ingress_exchange,
            routing_key=f"{mallory}.event",
            mandatory=True,
            properties=aiormq.spec.Basic.Properties(
                delivery_mode=2,
                expiration="1",
                user_id=mallory_credentials.user,
                headers={**forged, "x-kind": kind, "x-instance-id": key.instance_id},
            ),
        )
        assert isinstance(confirmation, aiormq.spec.Basic.Ack), confirmation
    await lanes_drained(raw.channel, topology)
    await start_worker()
    letters = await archived(store, [waiter.instance_id, sleeper.instance_id])
    assert {letter.reason for letter in letters} == {"expired"}

    replay = await cli("dlq", "replay", "--tenant", victim, "--reason", "expired", "--yes")
    assert replay.exit_code == 0, replay.output
    assert "0 letter(s) replayed" in replay.stdout
    assert f"{letters[0].id}: not replayed: sent by broker user" in replay.output
    assert f"{letters[1].id}: not replayed: producers may publish create and event" in (
        replay.output
    )
    shown = json.loads((await cli("dlq", "show", str(letters[0].id))).stdout)
    assert shown["sender"] == mallory_credentials.user

    await send_event(settings, topology, waiter, "go", {"from": "victim"}, "real")
    done = await finished(store, waiter)
    assert output(done) == {"w": {"from": "victim"}}
    still = await store.detail(sleeper)
    assert still is not None
    assert still.record.status is InstanceStatus.SLEEPING
    assert still.record.waiting == asleep.waiting


async def test_a_tenants_own_letter_is_replayed_and_checked_again_as_its_producer(
    settings, topology, broker, store, raw, start_worker, tenant, connect, playbook_wasm
):
    """An event the victim's own producer sent too early (held, then unknown-instance: its
    dead letter comes through the outbox as a worker's own) is replayed once
    the instance exists, as the victim's producer's message (x-replayed-for), and the worker
    checks it as such. A message the fleet publishes for another tenant's producer is refused
    by the worker, whatever the archive said."""
    owner, owner_credentials = await tenant()
    _, other_credentials = await tenant()
    digest = digest_of(playbook_wasm)
    await store.put_module(owner, digest, playbook_wasm)
    await start_worker(early_event_seconds=0.5)  # held half a second, then dead-lettered
    key = InstanceKey(owner, f"late-{uuid.uuid4().hex[:8]}")
    event_headers = {
        "x-tenant": owner,
        "x-instance-id": key.instance_id,
        "x-kind": "event",
        "x-schema-version": "1",
    }
    channel = await connect(owner_credentials)
    await channel.basic_publish(
        json.dumps({"event_id": "e1", "type": "go", "payload": 7}).encode(),
        exchange=topology.ingress_exchange,
        routing_key=f"{owner}.event",
        properties=aiormq.spec.Basic.Properties(
            delivery_mode=2, user_id=owner_credentials.user, headers=event_headers
        ),
    )
    early = await dead_letter_of(store, key.instance_id)
    assert early.reason == "unknown-instance"
    assert early.sender == owner_credentials.user
    assert early.first_exchange == topology.ingress_exchange

    async with Producer(settings.amqp_url, topology) as producer:
        await producer.create(
            CreateRequest(owner, digest, {"ops": [{"op": "wait", "name": "w", "type": "go"}]},
                          key.instance_id)
        )  # fmt: skip
    await wait_for_status(store, key, {InstanceStatus.WAITING})
    letters = DeadLetters(store, broker, topology, user_id=settings.broker_user, actor="test")
    outcome = await letters.replay(LetterFilter(ids=(early.id,)))
    assert outcome.done == [early.id], outcome.skipped
    assert output(await finished(store, key)) == {"w": 7}

    # The fleet replaying for the other tenant's producer a message naming the owner.
    smuggled = f"smuggled-{uuid.uuid4().hex[:8]}"
    await broker.publish_many(
        [
            Outgoing(
                topology.ingress_exchange,
                f"{owner}.event",
                b'{"event_id":"e2","type":"go"}',
                {**event_headers, "x-instance-id": smuggled,
                 REPLAYED_FOR: other_credentials.user},
            )
        ]
    )  # fmt: skip
    refused = await dead_letter_of(store, smuggled)
    assert refused.reason == "tenant-mismatch"
    assert refused.sender == other_credentials.user


# -- letters the database finds hard to store --------------------------------------------


async def test_a_letter_with_a_nul_byte_does_not_hold_up_the_archive(
    topology, broker, raw, store, start_worker
):
    """A create whose x-instance-id holds a NUL byte is dead-lettered bad-header; the archive
    stores it (NUL escaped) and goes on: the next letter, another tenant's, is archived too."""
    await start_worker()
    first, second = f"nul{uuid.uuid4().hex[:8]}", f"next{uuid.uuid4().hex[:8]}"
    headers = {
        "x-kind": "create",
        "x-schema-version": "1",
        "x-module": "sha256:" + "a" * 64,
    }
    nul_id = f"{uuid.uuid4().hex[:8]}"
    await broker.publish_many(
        [
            Outgoing(
                topology.ingress_exchange,
                f"{first}.create",
                b'{"params":{}}',
                {**headers, "x-tenant": first, "x-instance-id": f"bad\x00{nul_id}"},
                message_id=nul_id,
            )
        ]
    )
    await raw.dead_letter(nul_id)  # dead-lettered: from now on it is the archive's
    await broker.publish_many(
        [
            Outgoing(
                topology.ingress_exchange,
                f"{second}.create",
                b"{not json",
                {**headers, "x-tenant": second, "x-instance-id": "fine"},
            )
        ]
    )
    [nul_letter] = await archived_for(store, first, 1)
    assert nul_letter.reason == "bad-header"
    assert nul_letter.instance_id == f"bad\\x00{nul_id}"
    assert nul_letter.headers["x-instance-id"] == f"bad\x00{nul_id}"  # exact in the JSON
    [next_letter] = await archived_for(store, second, 1)
    assert next_letter.reason == "bad-body"


async def test_the_archive_stores_whatever_a_letter_holds(store):
    """Text PostgreSQL cannot hold (NUL, unpaired surrogates, values too long for an index)
    and any header value are stored, escaped, and read back."""
    tenant = f"odd{uuid.uuid4().hex[:8]}"
    nasty = {
        "x-tenant": tenant,
        "x-instance-id": "i\x00d",
        "x-module": "\ud800" * 3,
        "x-kind": "x" * 20_000,
        "x-dead-reason": "bad-header",
        "x-dead-detail": "\x00" * 5000,
        "x-dead-letter-id": f"nasty-{uuid.uuid4()}",
        "bytes": b"\xff\x00",
        "table": {"a": [1, 2.5, None, True, b"x"]},
    }
    letter = letter_of(
        Delivery(
            body=b"\x00" * 10,
            headers=nasty,
            routing_key="r\x00k",
            exchange="",
            message_id="m\x00",
            user_id=None,
            redelivered=False,
            delivery_count=0,
            _ack=None,  # type: ignore[arg-type]
            _release=None,  # type: ignore[arg-type]
        ),
        ArchivePolicy(Topology(), "nobody", frozenset(), 1 << 20, None),
    )
    assert (await store.dead_letters.archive([letter])).new == 1
    [stored] = await store.dead_letters.find(LetterFilter(tenant=tenant))
    assert stored.instance_id == "i\\x00d"
    assert stored.module == "\\ud800" * 3
    assert stored.kind is not None
    assert len(stored.kind) <= 512
    assert stored.routing_key == "r\\x00k"
    assert stored.headers["x-instance-id"] == "i\x00d"
    assert stored.headers["bytes"] == "\\xff\x00"
    assert stored.body == b"\x00" * 10


# -- how much the archive keeps ------------------------------------------------------------


async def test_the_archive_keeps_bounded_bodies_and_a_bounded_share_per_tenant(
    cli, topology, broker, store, start_worker
):
    """A body refused as too large keeps a prefix, its size and its hash, and is never
    replayed; once a tenant's letters keep more than the tenant's bound, later letters keep
    their metadata and reason but no body. Purging gives the room back."""
    await start_worker(max_message_bytes=2048, dead_letter_tenant_bytes=12_000)
    tenant = f"big{uuid.uuid4().hex[:8]}"

    def create(instance_id: str, body: bytes) -> Outgoing:
        headers = {
            "x-tenant": tenant,
            "x-instance-id": instance_id,
            "x-kind": "create",
            "x-schema-version": "1",
            "x-module": "sha256:" + "a" * 64,
        }
        return Outgoing(topology.ingress_exchange, f"{tenant}.create", body, headers)

    huge = bytes(range(256)) * 32  # 8 KiB
    await broker.publish_many([create("huge", huge)])
    [letter] = await archived_for(store, tenant, 1)
    assert letter.reason == "too-large"
    assert len(letter.body) == 4096
    shown = json.loads((await cli("dlq", "show", str(letter.id))).stdout)
    assert shown["body_truncated"] is True
    assert shown["body_size"] == len(huge)
    assert shown["body_sha256"] == hashlib.sha256(huge).hexdigest()
    refused = await cli("dlq", "replay", str(letter.id))
    assert "0 letter(s) replayed" in refused.stdout
    assert "over the fleet's limit of 2048" in refused.output

    await broker.publish_many([create(f"junk-{i}", b"{" + b" " * 1900) for i in range(6)])
    letters = await archived_for(store, tenant, 7)
    junk = [found for found in letters if found.instance_id != "huge"]
    kept = [found for found in junk if found.body]
    stripped = [found for found in junk if not found.body]
    assert kept
    assert stripped
    for found in stripped:
        assert found.reason == "bad-body"
        assert found.body_size == 1901
        assert found.unreplayable is not None
        assert "over its bound of 12000 bytes" in found.unreplayable
        assert found.headers["x-instance-id"] == found.instance_id
    listed = await cli("dlq", "list", "--tenant", tenant, "--json")
    assert len(listed.stdout.splitlines()) == 7  # nothing vanished

    purged = await cli("dlq", "purge", "--tenant", tenant, "--yes")
    assert "7 letter(s) purged" in purged.stdout
    await broker.publish_many([create("after-purge", b"{" + b" " * 1900)])
    [after] = await archived_for(store, tenant, 1)
    assert len(after.body) == 1901


async def archived_for(store, tenant: str, count: int, timeout: float = 15.0):
    """Wait until a tenant has `count` archived letters; return them."""
    async with asyncio.timeout(timeout):
        while True:
            found = await store.dead_letters.find(LetterFilter(tenant=tenant))
            if len(found) >= count:
                return found
            await asyncio.sleep(0.1)
