"""Long guest runs in guest processes (sandbox/guest_pool.py): the same outcomes as in the
worker's own sandbox, every limit kept, tenants taking turns, and a dead or stuck process
replaced without taking other runs with it."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import structlog.testing
import wasmtime

from stepfleet.sandbox import (
    GuestProcessLost,
    GuestProcessPool,
    GuestRun,
    ReplayJournal,
    SandboxLimits,
    WasmSandbox,
    encode_replay_buffer,
)
from stepfleet.sandbox.guest_pool import _SchemasOnly
from stepfleet.schemas import GuestCrashed, GuestReport, StepFailed, StepSucceeded, digest_of
from tests.conftest import EXAMPLES, ORDER_PARAMS
from tests.unit.test_sandbox_hostile import BEGIN_SPIN, SPIN, guest, spinning_step

HOSTILE = Path(__file__).resolve().parents[2] / "guest" / "hostile"
LIMITS = SandboxLimits(fuel_per_run=300_000_000, memory_bytes=8 * 1024 * 1024)


def hostile(name: str) -> bytes:
    return wasmtime.wat2wasm((HOSTILE / f"{name}.wat").read_text())


def job(sandbox: WasmSandbox, wasm: bytes, params: str = "{}", tenant: str = "acme") -> GuestRun:
    digest = digest_of(wasm)
    if not sandbox.is_loaded(digest):
        sandbox.load(digest, wasm)
    buffer = encode_replay_buffer("i-1", params, ReplayJournal())
    return GuestRun(digest, buffer, tenant=tenant, instance="i-1")


@pytest.fixture(scope="module")
def sandbox():
    sandbox = WasmSandbox(LIMITS)
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module")
def pool(sandbox):
    pool = GuestProcessPool(sandbox, 1)
    yield pool
    pool.close()


CASES = {
    "order": lambda: (EXAMPLES / "order" / "order.wasm").read_bytes(),
    "greeter": lambda: (EXAMPLES / "greeter" / "greeter.wasm").read_bytes(),
    "loop": lambda: hostile("loop"),
    "membomb": lambda: hostile("membomb"),
    "recursion": lambda: hostile("recursion"),
    "trap_mid_step": lambda: hostile("trap_mid_step"),
    "huge_output": lambda: hostile("huge_output"),
    "returns_without_outcome": lambda: hostile("returns_without_outcome"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_run_in_a_guest_process_reports_what_it_reports_in_the_worker(sandbox, pool, name):
    params = json.dumps(ORDER_PARAMS) if name == "order" else '{"name":"Ada"}'
    run = job(sandbox, CASES[name](), params)
    here = sandbox.run(run)
    there = pool.submit(run).result(timeout=60)
    assert there == here
    if name == "order":
        assert isinstance(there.outcome, StepSucceeded)
        assert there.logs  # the guest's own lines come back with the report
    if name == "loop":
        assert there.outcome.limit == "cpu"


def test_a_step_spinning_in_a_guest_process_is_stopped_at_its_timeout():
    roomy = WasmSandbox(SandboxLimits(fuel_per_run=10**11, run_timeout_ms=3_600_000))
    pool = GuestProcessPool(roomy, 1)
    try:
        report = pool.submit(job(roomy, spinning_step(BEGIN_SPIN + SPIN))).result(timeout=60)
    finally:
        pool.close()
        roomy.close()
    assert isinstance(report.outcome, StepFailed)
    assert report.outcome.message == "step 'spin' timed out after 150 ms"
    assert report.outcome.limit == "timeout"


def test_a_guest_process_that_crashes_fails_its_run_and_is_replaced(sandbox):
    pool = GuestProcessPool(sandbox, 1)
    try:
        order = job(sandbox, CASES["order"](), json.dumps(ORDER_PARAMS))
        assert isinstance(pool.submit(order).result(timeout=60).outcome, StepSucceeded)
        # A run spinning for seconds of fuel, and the process crashing under it.
        spinning = pool.submit(dataclasses.replace(job(sandbox, guest(SPIN)), fuel_per_run=10**11))
        [pid] = _wait_for_pids(pool, 1)
        os.kill(pid, signal.SIGABRT)
        report = spinning.result(timeout=60)
        assert report.outcome == GuestCrashed(
            f"the guest process crashed during the run (signal {signal.SIGABRT})"
        )
        # The next run gets a new process, which is given the module again.
        again = pool.submit(order).result(timeout=60)
        assert isinstance(again.outcome, StepSucceeded)
        assert (pool.stats.started, pool.stats.died) == (2, 1)
        assert pool.pids() != [pid]
    finally:
        pool.close()


def test_a_guest_process_stopped_from_outside_leaves_its_run_to_be_made_again(sandbox):
    """Killed by the OOM killer or an operator: not the guest's doing, so its run is not
    failed but raises, and the message is processed again."""
    pool = GuestProcessPool(sandbox, 1)
    try:
        spinning = pool.submit(dataclasses.replace(job(sandbox, guest(SPIN)), fuel_per_run=10**11))
        [pid] = _wait_for_pids(pool, 1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(GuestProcessLost, match=r"ended during the run \(signal 9\)"):
            spinning.result(timeout=60)
        order = job(sandbox, CASES["order"](), json.dumps(ORDER_PARAMS))
        assert isinstance(pool.submit(order).result(timeout=60).outcome, StepSucceeded)
    finally:
        pool.close()


def test_a_guest_process_ignores_a_sigterm_to_its_group(sandbox):
    """A service manager stopping the worker signals its guest processes too: they finish
    the run under way, for the worker's graceful stop."""
    pool = GuestProcessPool(sandbox, 1)
    try:
        order = job(sandbox, CASES["order"](), json.dumps(ORDER_PARAMS))
        assert isinstance(pool.submit(order).result(timeout=60).outcome, StepSucceeded)
        looping = pool.submit(job(sandbox, guest(SPIN)))
        [pid] = _wait_for_pids(pool, 1)
        os.kill(pid, signal.SIGTERM)
        assert looping.result(timeout=60).outcome.limit == "cpu"
        assert pool.pids() == [pid]
    finally:
        pool.close()


def test_a_guest_process_that_stops_answering_is_killed_past_the_run_timeout():
    short = WasmSandbox(SandboxLimits(fuel_per_run=10**11, run_timeout_ms=300))
    pool = GuestProcessPool(short, 1, grace_seconds=0.5)
    try:
        order = job(short, CASES["order"](), json.dumps(ORDER_PARAMS))
        assert isinstance(pool.submit(order).result(timeout=60).outcome, StepSucceeded)
        [pid] = pool.pids()
        os.kill(pid, signal.SIGSTOP)  # hung: neither the guest nor its ticker goes on
        report = pool.submit(order).result(timeout=60)
        assert report.outcome == GuestCrashed(
            "the guest process did not finish the run in 0.8 s and was stopped", "timeout"
        )
        assert isinstance(pool.submit(order).result(timeout=60).outcome, StepSucceeded)
        assert (pool.stats.started, pool.stats.killed) == (2, 1)
    finally:
        pool.close()
        short.close()


def test_tenants_take_turns_at_the_guest_processes(sandbox):
    """One tenant's queue of long runs delays another tenant's long run by one run, not by
    the whole queue: the other tenant's run finishes before the first tenant's last."""
    pool = GuestProcessPool(sandbox, 1)
    finished: list[str] = []
    try:
        wasm = guest(SPIN)  # each run spins through its 300 million units of fuel
        futures = []
        for name, tenant in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")]:
            future = pool.submit(job(sandbox, wasm, tenant=tenant))
            future.add_done_callback(lambda _, name=name: finished.append(name))
            futures.append(future)
        for future in futures:
            assert future.result(timeout=120).outcome.limit == "cpu"
    finally:
        pool.close()
    assert finished.index("b1") < finished.index("a3")
    assert finished.index("a1") < finished.index("a2") < finished.index("a3")


def test_closing_the_pool_cancels_the_queued_runs(sandbox):
    pool = GuestProcessPool(sandbox, 1)
    roomy = dataclasses.replace(job(sandbox, guest(SPIN)), fuel_per_run=10**11)
    running = pool.submit(roomy)
    queued = pool.submit(roomy)
    _wait_for_pids(pool, 1)
    with structlog.testing.capture_logs() as logs:
        pool.close()
        assert queued.cancelled()
        with pytest.raises(GuestProcessLost, match="the worker stopped during the run"):
            running.result(timeout=60)
    # A run the worker's own stop ends is no guest process dying.
    assert [entry["event"] for entry in logs] == ["guest_run_stopped"]
    assert pool.stats.died == 0
    with pytest.raises(RuntimeError):
        pool.submit(roomy)


def test_an_answer_naming_anything_but_the_report_types_is_refused():
    hostile_answer = pickle.dumps((True, os.system))
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system is not allowed"):
        _SchemasOnly(io.BytesIO(hostile_answer)).load()
    report = GuestReport(GuestCrashed("x", "cpu"), (), [(1, "line")])
    assert _SchemasOnly(io.BytesIO(pickle.dumps((True, report)))).load() == (True, report)


def test_a_module_the_worker_has_not_loaded_cannot_be_submitted(sandbox, pool):
    with pytest.raises(KeyError):
        pool.submit(GuestRun("sha256:" + "00" * 32, b""))


def _wait_for_pids(pool: GuestProcessPool, count: int) -> list[int]:
    for _ in range(1000):
        pids = pool.pids()
        if len(pids) == count:
            time.sleep(0.2)  # let the run reach the guest
            return pids
        time.sleep(0.01)
    raise AssertionError("no guest process started")
