"""Moving running instances to other code, with a dry run that replays their journals, and
pausing every instance of a module at once."""

from __future__ import annotations

import pytest

from stepfleet.control import ModuleMoves, Verdict
from stepfleet.sandbox import WasmSandbox
from stepfleet.schemas import InstanceStatus, digest_of
from tests.integration.conftest import wait_for_status
from tests.integration.test_primitives import WEEK_MS, bring_timer_forward, finished, reached

pytestmark = pytest.mark.services


def with_custom_section(wasm: bytes, note: bytes) -> bytes:
    """The same program under another digest: a custom section changes bytes, not behaviour."""
    name = b"stepfleet-test"
    payload = bytes([len(name)]) + name + note
    return wasm + bytes([0, len(payload)]) + payload


@pytest.fixture
def moves(store):
    sandbox = WasmSandbox()
    yield ModuleMoves(store, sandbox)
    sandbox.close()


async def test_dry_run_lists_nondeterministic_instances_and_move_takes_the_rest(
    store, start_worker, playbook, playbook_wasm, greeter_wasm, moves
):
    await start_worker()
    keys = [
        await playbook({"op": "sleep", "name": "week", "ms": WEEK_MS}, {"op": "do", "name": "a"})
        for _ in range(2)
    ]
    for key in keys:
        await reached(store, key, InstanceStatus.SLEEPING)
    old = digest_of(playbook_wasm)
    same = with_custom_section(playbook_wasm, b"v2")
    same_digest = digest_of(same)
    await store.put_module("acme", same_digest, same)
    await store.put_module("acme", digest_of(greeter_wasm), greeter_wasm)

    bad = await moves.check("acme", digest_of(greeter_wasm), from_module=old)
    ours = {check.key: check for check in bad if check.key in keys}
    assert {check.verdict for check in ours.values()} == {Verdict.NONDETERMINISTIC}
    # The greeter's program does not follow a sleeper's journal.
    assert ours[keys[0]].detail.startswith("nondeterminism")
    refused = await moves.move("acme", digest_of(greeter_wasm), from_module=old)
    assert not any(check.moved for check in refused)

    good = await moves.check("acme", same_digest, from_module=old)
    assert {c.verdict for c in good if c.key in keys} == {Verdict.COMPATIBLE}
    for key in keys:  # a dry run changes nothing
        detail = await store.detail(key)
        assert detail is not None
        assert detail.record.module == old

    moved = await moves.move("acme", same_digest, from_module=old)
    assert {c.key for c in moved if c.moved} >= set(keys)
    for key in keys:
        await bring_timer_forward(store, key)
        detail = await finished(store, key)
        assert detail.record.status is InstanceStatus.COMPLETE
        assert detail.record.module == same_digest


async def test_pause_and_resume_every_instance_of_a_module(
    store, control, start_worker, playbook, playbook_wasm
):
    await start_worker()
    keys = [await playbook({"op": "sleep", "name": "s", "ms": WEEK_MS}) for _ in range(3)]
    for key in keys:
        await reached(store, key, InstanceStatus.SLEEPING)
    paused = await control.pause_module("acme", digest_of(playbook_wasm))
    assert set(keys) <= set(paused)
    for key in keys:
        await wait_for_status(store, key, {InstanceStatus.PAUSED})
    resumed = await control.resume_module("acme", digest_of(playbook_wasm))
    assert set(keys) <= set(resumed)
    for key in keys:
        await wait_for_status(store, key, {InstanceStatus.SLEEPING})
