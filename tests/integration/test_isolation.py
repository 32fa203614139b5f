"""One delivery's failure ends that delivery alone: the rest of its batch goes on.

Before, a guest value the host could not handle (a sleep past any date) or a host bug that one
module triggers failed the worker's whole batch again and again, until RabbitMQ dead-lettered
every message in it, other tenants' creates included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from stepfleet.client import CreateRequest, Producer
from stepfleet.sandbox import GuestRun, WasmSandbox
from stepfleet.schemas import GuestReport, InstanceKey, InstanceStatus, digest_of
from stepfleet.workers.worker import Worker
from tests.integration.conftest import wait_for_status

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED}
I64_MAX = 2**63 - 1


class _RawKey(str):
    """A header name whose lone surrogates go on the wire as the raw bytes they stand for."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return super().encode(encoding, "surrogateescape")


class HostBugFor:
    """A sandbox whose runs for one tenant raise, past position `from_position`: any bug a
    guest could make host code hit."""

    def __init__(self, inner: WasmSandbox, tenant: str, from_position: int) -> None:
        self._inner = inner
        self._tenant = tenant
        self._from = from_position

    def run(self, job: GuestRun) -> GuestReport:
        if job.tenant == self._tenant and job.journal_length >= self._from:
            raise RuntimeError("host bug\x00 triggered by this guest")
        return self._inner.run(job)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def _create_many(settings, topology, store, wasm: bytes, plan: dict[str, list[Any]]):
    """Publish every create before any worker runs, so they share batches."""
    digest = digest_of(wasm)
    keys: dict[str, list[InstanceKey]] = {}
    async with Producer(settings.amqp_url, topology) as producer:
        for tenant, ops_list in plan.items():
            await store.put_module(tenant, digest, wasm)
            for ops in ops_list:
                key = InstanceKey(tenant, f"iso-{uuid.uuid4().hex[:12]}")
                await producer.create(CreateRequest(tenant, digest, {"ops": ops}, key.instance_id))
                keys.setdefault(tenant, []).append(key)
    return keys


STEPS = [{"op": "do", "name": "one"}, {"op": "do", "name": "two"}]


@contextlib.asynccontextmanager
async def host_bug_worker(settings, tenant: str, from_position: int) -> AsyncIterator[None]:
    """A worker whose runs for `tenant` hit a host bug from `from_position` on."""
    sandbox = HostBugFor(WasmSandbox(settings.sandbox_limits()), tenant, from_position)
    worker = Worker(settings, sandbox=sandbox, name="isolating")  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def all_complete(store, keys: list[InstanceKey]) -> None:
    for key in keys:
        record, _ = await wait_for_status(store, key, FINAL)
        assert record.status is InstanceStatus.COMPLETE


async def test_a_sleep_past_any_date_errors_its_instance_and_spares_the_batch(
    settings, topology, store, start_worker, playbook_wasm
) -> None:
    keys = await _create_many(
        settings,
        topology,
        store,
        playbook_wasm,
        {
            "iso-sleeper": [
                [{"op": "sleep", "name": "forever", "ms": I64_MAX}],
                [{"op": "sleep_until", "name": "never", "at_ms": I64_MAX}],
            ],
            "iso-bystander": [STEPS] * 12,
        },
    )
    await start_worker()
    for key in keys["iso-sleeper"]:
        record, _ = await wait_for_status(store, key, FINAL)
        assert record.status is InstanceStatus.ERRORED
        # The sandbox refuses it, and the engine would too: either way the error names it.
        assert f"{I64_MAX} ms is" in (record.error or "") or f"until {I64_MAX} is" in (
            record.error or ""
        ), record.error
    await all_complete(store, keys["iso-bystander"])


async def test_a_host_failure_in_one_step_errors_that_instance_only(
    settings, topology, store, broker, playbook_wasm
) -> None:
    keys = await _create_many(
        settings,
        topology,
        store,
        playbook_wasm,
        {"iso-buggy": [STEPS] * 3, "iso-neighbour": [STEPS] * 12},
    )
    async with host_bug_worker(settings, "iso-buggy", from_position=1):
        for key in keys["iso-buggy"]:
            record, _ = await wait_for_status(store, key, FINAL)
            assert record.status is InstanceStatus.ERRORED
            assert record.position == 1  # the first step is kept; `stepfleet retry` goes on
            assert record.error == (
                "stepfleet could not process its step: RuntimeError: host bug\ufffd triggered "
                "by this guest"
            )
        await all_complete(store, keys["iso-neighbour"])


async def test_a_create_that_fails_alone_is_dead_lettered_unprocessable(
    settings, topology, store, broker, raw, playbook_wasm
) -> None:
    keys = await _create_many(
        settings,
        topology,
        store,
        playbook_wasm,
        {"iso-doomed": [STEPS], "iso-healthy": [STEPS] * 6},
    )
    async with host_bug_worker(settings, "iso-doomed", from_position=0):
        doomed = keys["iso-doomed"][0]
        letter = await raw.dead_letter(f"{doomed.tenant}/{doomed.instance_id}/create", 30)
        headers = letter.header.properties.headers or {}
        assert headers["x-dead-reason"] == "unprocessable"
        assert "RuntimeError: host bug" in str(headers["x-dead-detail"])
        await all_complete(store, keys["iso-healthy"])
        assert not await store.find_instances(doomed.instance_id, doomed.tenant)


async def test_a_message_with_invalid_utf8_in_its_properties_does_not_cut_the_worker_off(
    settings, topology, store, start_worker, playbook_wasm, monkeypatch
):
    """RabbitMQ passes on short strings that are not UTF-8; the worker used to lose its whole
    connection on such a message, again at every redelivery. Now it is judged like any other:
    this one is a valid create, so it runs, and so do the others."""
    import aiormq
    from pamqp import encode

    tenant = "iso-bytes"
    digest = digest_of(playbook_wasm)
    await store.put_module(tenant, digest, playbook_wasm)
    await start_worker()
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        original = encode._string

        def raw_bytes(encoder: Any, value: str) -> bytes:  # lone surrogates become raw bytes
            raw = value.encode("utf-8", "surrogateescape")
            return encoder.pack(len(raw)) + raw

        keys = [InstanceKey(tenant, f"bytes-{uuid.uuid4().hex[:8]}") for _ in range(3)]
        for index, key in enumerate(keys):
            headers = {
                "x-tenant": tenant,
                "x-instance-id": key.instance_id,
                "x-module": digest,
                "x-kind": "create",
                "x-schema-version": "1",
            }
            if index == 0:
                headers[_RawKey("x-\udcfe-name")] = "a header name that is not UTF-8"
            monkeypatch.setattr(encode, "_string", raw_bytes if index == 0 else original)
            await channel.basic_publish(
                json.dumps({"params": {"ops": STEPS}}).encode(),
                exchange=topology.ingress_exchange,
                routing_key=f"{tenant}.create",
                properties=aiormq.spec.Basic.Properties(
                    delivery_mode=2,
                    message_id="\udcff\udcfe" if index == 0 else key.instance_id,
                    headers=headers,
                    user_id="guest",
                ),
            )
        monkeypatch.setattr(encode, "_string", original)
    finally:
        await connection.close()
    await all_complete(store, keys)
