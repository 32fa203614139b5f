"""One delivery's failure ends that delivery alone: the rest of its batch goes on.

Before, a guest value the host could not handle (a sleep past any date) or a host bug that one
module triggers failed the worker's whole batch again and again, until RabbitMQ dead-lettered
every message in it, other tenants' creates included.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from stepfleet.client import CreateRequest, Producer
from stepfleet.sandbox import GuestRun, WasmSandbox
from stepfleet.schemas import GuestReport, InstanceKey, InstanceStatus, digest_of
from stepfleet.workers.worker import Worker
from tests.integration.conftest import wait_for_status

FINAL = {InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED}
I64_MAX = 2**63 - 1


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
    for key in keys["iso-bystander"]:
        record, _ = await wait_for_status(store, key, FINAL)
        assert record.status is InstanceStatus.COMPLETE


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
    sandbox = HostBugFor(WasmSandbox(settings.sandbox_limits()), "iso-buggy", from_position=1)
    worker = Worker(settings, sandbox=sandbox, name="isolating")  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    try:
        for key in keys["iso-buggy"]:
            record, _ = await wait_for_status(store, key, FINAL)
            assert record.status is InstanceStatus.ERRORED
            assert record.position == 1  # the first step is kept; `stepfleet retry` goes on
            assert record.error == (
                "stepfleet could not process its step: RuntimeError: host bug\ufffd triggered "
                "by this guest"
            )
        for key in keys["iso-neighbour"]:
            record, _ = await wait_for_status(store, key, FINAL)
            assert record.status is InstanceStatus.COMPLETE
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


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
    sandbox = HostBugFor(WasmSandbox(settings.sandbox_limits()), "iso-doomed", from_position=0)
    worker = Worker(settings, sandbox=sandbox, name="isolating")  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    try:
        doomed = keys["iso-doomed"][0]
        letter = await raw.dead_letter(f"{doomed.tenant}/{doomed.instance_id}/create", 30)
        headers = letter.header.properties.headers or {}
        assert headers["x-dead-reason"] == "unprocessable"
        assert "RuntimeError: host bug" in str(headers["x-dead-detail"])
        for key in keys["iso-healthy"]:
            record, _ = await wait_for_status(store, key, FINAL)
            assert record.status is InstanceStatus.COMPLETE
        assert not await store.find_instances(doomed.instance_id, doomed.tenant)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
