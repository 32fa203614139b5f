"""Compile limits in the worker: compiles run off the wasm thread, and a module over a limit
ends its instances with the limit named while the worker and other tenants go on."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from stepfleet.client import CreateRequest, Producer
from stepfleet.sandbox import ModuleCompiler
from stepfleet.schemas import InstanceKey, InstanceStatus, digest_of
from stepfleet.store import PgStore
from tests.integration.conftest import wait_for_status
from tests.wasm_bombs import CALLS_BODY, guest

pytestmark = pytest.mark.services


async def start(settings, topology, tenant: str, digest: str, label: str) -> InstanceKey:
    instance_id = f"{label}-{uuid.uuid4().hex[:12]}"
    async with Producer(settings.amqp_url, topology) as producer:
        await producer.create(CreateRequest(tenant, digest, {}, instance_id))
    return InstanceKey(tenant, instance_id)


async def push(store: PgStore, tenant: str, wasm: bytes) -> str:
    """Store a module as a push would, but without its checks: as if pushed before the limits."""
    digest = digest_of(wasm)
    await store.put_module(tenant, digest, wasm)
    return digest


@pytest.mark.parametrize(
    ("limits", "setting"),
    [
        ({"module_functions": 1_000}, "STEPFLEET_MODULE_FUNCTIONS"),
        (
            {"module_functions": 100_000, "compile_timeout_seconds": 1},
            "STEPFLEET_COMPILE_TIMEOUT_SECONDS",
        ),
    ],
    ids=["functions", "compile-time"],
)
async def test_a_module_over_the_compile_limits_ends_its_instances_naming_the_limit(
    settings, topology, store, start_worker, tmp_path, limits, setting
):
    """Every instance of a module the worker's limits refuse errors with the limit in its error;
    another tenant's workflow on the same worker completes."""
    run = uuid.uuid4().hex[:8]
    bomb = await push(store, f"bomb-{run}", guest(40_000, CALLS_BODY, tag=run))
    calm = await push(store, f"calm-{run}", guest(tag=run))
    await start_worker(module_cache_dir=tmp_path / "modules", **limits)
    bombs = [await start(settings, topology, f"bomb-{run}", bomb, "bomb") for _ in range(2)]
    other = await start(settings, topology, f"calm-{run}", calm, "calm")
    for key in bombs:
        record, _ = await wait_for_status(store, key, {InstanceStatus.ERRORED})
        assert f"module {bomb} refused" in record.error
        assert setting in record.error
    await wait_for_status(store, other, {InstanceStatus.COMPLETE})


async def test_a_compile_does_not_hold_up_another_tenants_steps(
    settings, topology, store, start_worker, tmp_path, monkeypatch
):
    """While one tenant's module compiles (held here until the test lets it go), the worker runs
    another tenant's workflow, whose module it has loaded, to completion."""
    run = uuid.uuid4().hex[:8]
    loaded = await push(store, f"loaded-{run}", guest(tag=f"loaded-{run}"))
    new = await push(store, f"new-{run}", guest(tag=f"new-{run}"))
    await start_worker(module_cache_dir=tmp_path / "modules")
    first = await start(settings, topology, f"loaded-{run}", loaded, "first")
    await wait_for_status(store, first, {InstanceStatus.COMPLETE})

    compiling, release = threading.Event(), threading.Event()
    compile_module = ModuleCompiler.compile

    def held(self: ModuleCompiler, wasm: bytes) -> bytes:
        compiling.set()
        release.wait(60)
        return compile_module(self, wasm)

    monkeypatch.setattr(ModuleCompiler, "compile", held)
    try:
        waiting = await start(settings, topology, f"new-{run}", new, "waiting")
        assert await asyncio.to_thread(compiling.wait, 20), "the new module was never compiled"
        second = await start(settings, topology, f"loaded-{run}", loaded, "second")
        await wait_for_status(store, second, {InstanceStatus.COMPLETE})
        assert not release.is_set()
        found = await store.find_instances(waiting.instance_id, waiting.tenant)
        assert not found or found[0][0].status is not InstanceStatus.COMPLETE
    finally:
        release.set()
    await wait_for_status(store, waiting, {InstanceStatus.COMPLETE})
