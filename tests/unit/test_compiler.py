"""Compiling under limits: shape limits before compiling, CPU and memory caps on the compiler
process, remembered refusals, and artifacts made off the thread that loads them."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from stepfleet.sandbox import (
    CompiledModuleCache,
    CompileFailed,
    CompileLimitExceeded,
    GuestRun,
    InvalidModule,
    ModuleCompiler,
    ReplayJournal,
    SandboxLimits,
    WasmSandbox,
    encode_replay_buffer,
)
from stepfleet.schemas import Completed, StepSucceeded, digest_of
from tests.conftest import ORDER_PARAMS
from tests.wasm_bombs import CALLS_BODY, body_of_size, body_with_locals, guest

MIB = 1024 * 1024
BOMB = guest(40_000, CALLS_BODY)
"""800 KB, well under the module size limit: 40,000 functions take seconds and hundreds of MiB
to compile, so small test limits trip at once."""
ORDER = json.dumps(ORDER_PARAMS)
ROOMY = {"module_functions": 100_000}
"""Shape limits that let BOMB through to the compiler."""


@pytest.fixture
def sandboxes() -> Iterator[Callable[..., WasmSandbox]]:
    made: list[WasmSandbox] = []

    def make(cache: CompiledModuleCache | None = None, **limits: int) -> WasmSandbox:
        sandbox = WasmSandbox(SandboxLimits(**limits), module_cache=cache)
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        sandbox.close()


@pytest.mark.parametrize(
    ("limits", "wasm", "limit", "setting"),
    [
        ({"module_functions": 1_000}, guest(50_000), "functions", "STEPFLEET_MODULE_FUNCTIONS"),
        (
            {"function_body_bytes": 64 * 1024},
            guest(1, body_of_size(300_000)),
            "function-size",
            "STEPFLEET_FUNCTION_BODY_BYTES",
        ),
        (
            {"function_locals": 1_000},
            guest(2, body_with_locals(50_000)),
            "locals",
            "STEPFLEET_FUNCTION_LOCALS",
        ),
    ],
    ids=["functions", "function-size", "locals"],
)
def test_shape_limits_refuse_before_compiling(sandboxes, limits, wasm, limit, setting):
    """Too many functions, too large a function or too many locals: refused by a parse of the
    sections, naming the limit and its setting, with no compiler process started."""
    sandbox = sandboxes(**limits)
    with pytest.raises(CompileLimitExceeded, match=setting) as refused:
        sandbox.validate(wasm)
    assert refused.value.limit == limit
    assert sandbox.compiler.stats.compiled == 0


@pytest.mark.parametrize(
    ("limits", "limit", "setting"),
    [
        ({"compile_timeout_seconds": 1}, "compile-time", "STEPFLEET_COMPILE_TIMEOUT_SECONDS"),
        ({"compile_memory_bytes": 128 * MIB}, "compile-memory", "STEPFLEET_COMPILE_MEMORY_BYTES"),
    ],
    ids=["time", "memory"],
)
def test_the_compiler_process_is_capped(sandboxes, limits, limit, setting):
    """A module within the shape limits whose compile needs more CPU or memory than allowed is
    refused naming the limit; the cap ends the compiler process, not this one."""
    sandbox = sandboxes(**ROOMY, **limits)
    with pytest.raises(CompileLimitExceeded, match=setting) as refused:
        sandbox.validate(BOMB)
    assert refused.value.limit == limit
    assert isinstance(refused.value, InvalidModule)


def test_real_modules_pass_small_limits(sandboxes, order_wasm, greeter_wasm):
    """The example modules compile and run under limits far below the defaults."""
    sandbox = sandboxes(
        module_functions=200,
        function_body_bytes=16 * 1024,
        function_locals=100,
        compile_timeout_seconds=1,
        compile_memory_bytes=128 * MIB,
    )
    sandbox.validate(greeter_wasm)
    digest = digest_of(order_wasm)
    sandbox.load(digest, order_wasm)
    report = sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", ORDER, ReplayJournal())))
    assert isinstance(report.outcome, StepSucceeded)


def test_a_refusal_is_remembered(sandboxes):
    """The same bytes are refused again without another compiler process."""
    sandbox = sandboxes(**ROOMY, compile_timeout_seconds=1)
    digest = digest_of(BOMB)
    for _ in range(2):
        with pytest.raises(CompileLimitExceeded, match="STEPFLEET_COMPILE_TIMEOUT_SECONDS"):
            sandbox.compiler.artifact(digest, BOMB)
    assert (sandbox.compiler.stats.compiled, sandbox.compiler.stats.refused) == (0, 2)


@pytest.mark.parametrize(
    ("child", "wall_seconds", "expected", "message"),
    [
        ("import time; time.sleep(60)", 0.2, CompileFailed, "wall-clock"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 60, CompileFailed, "exit -15"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", 60, InvalidModule, "crashed"),
    ],
    ids=["starved", "stopped", "crashed"],
)
def test_what_ends_the_compiler_decides_refusal_or_retry(
    sandboxes, monkeypatch, child, wall_seconds, expected, message
):
    """A compiler starved past the wall-clock bound or stopped from outside says nothing about
    the module: CompileFailed (not an InvalidModule), not remembered. One that crashes on the
    module would crash again: a refusal, remembered."""
    compiler = sandboxes().compiler
    monkeypatch.setattr(compiler, "_command", [sys.executable, "-c", child])
    monkeypatch.setattr(compiler, "_wall_seconds", wall_seconds)
    wasm = guest(tag=child)
    digest = digest_of(wasm)
    with pytest.raises(expected, match=message) as ended:
        compiler.artifact(digest, wasm)
    assert isinstance(ended.value, InvalidModule) == (expected is InvalidModule)
    monkeypatch.undo()
    if expected is InvalidModule:
        with pytest.raises(InvalidModule, match=message):
            compiler.artifact(digest, wasm)
    else:
        assert compiler.artifact(digest, wasm)


def test_the_artifact_is_made_off_the_loading_thread(sandboxes, tmp_path, monkeypatch):
    """`submit` compiles on the compiler's own thread (into the disk cache too); the sandbox's
    thread only loads the artifact, and a new sandbox on that cache reads it, not compiles."""
    threads: list[str] = []
    compile_module = ModuleCompiler.compile

    def noting(self: ModuleCompiler, wasm: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return compile_module(self, wasm)

    monkeypatch.setattr(ModuleCompiler, "compile", noting)
    wasm = guest(tag="off-thread")
    digest = digest_of(wasm)
    sandbox = sandboxes(CompiledModuleCache(tmp_path / "modules"))
    sandbox.load(digest, wasm, sandbox.compiler.submit(digest, wasm).result())
    report = sandbox.run(GuestRun(digest, encode_replay_buffer("i-1", "{}", ReplayJournal())))
    assert report.outcome == Completed(0, "{}")
    assert len(threads) == 1
    assert threads[0] != threading.current_thread().name

    again = sandboxes(CompiledModuleCache(tmp_path / "modules"))
    again.load(digest, wasm, again.compiler.submit(digest, wasm).result())
    assert (again.compiler.stats.compiled, again.compiler.stats.from_disk) == (0, 1)
    assert len(threads) == 1


def test_a_module_asked_for_twice_at_once_is_compiled_once(sandboxes, monkeypatch):
    """Two batches missing the same module share one compile."""
    started, release = threading.Event(), threading.Event()
    compile_module = ModuleCompiler.compile

    def held(self: ModuleCompiler, wasm: bytes) -> bytes:
        started.set()
        release.wait(30)
        return compile_module(self, wasm)

    monkeypatch.setattr(ModuleCompiler, "compile", held)
    compiler = sandboxes().compiler
    wasm = guest(tag="twice")
    first = compiler.submit(digest_of(wasm), wasm)
    assert started.wait(30)
    second = compiler.submit(digest_of(wasm), wasm)
    release.set()
    assert second is first
    assert first.result() == second.result()
    assert compiler.stats.compiled == 1


def test_lowered_shape_limits_apply_to_artifacts_already_on_disk(sandboxes, tmp_path):
    """An artifact compiled under higher limits is not handed out past a lowered one."""
    wasm = guest(50, tag="lowered")
    digest = digest_of(wasm)
    sandboxes(CompiledModuleCache(tmp_path / "modules")).compiler.artifact(digest, wasm)
    lowered = sandboxes(CompiledModuleCache(tmp_path / "modules"), module_functions=10)
    with pytest.raises(CompileLimitExceeded, match="STEPFLEET_MODULE_FUNCTIONS"):
        lowered.compiler.artifact(digest, wasm)


def test_artifact_refuses_bytes_that_do_not_match_the_digest(sandboxes, order_wasm):
    """What gets compiled and cached under a digest is what hashes to it."""
    with pytest.raises(InvalidModule, match="do not hash to"):
        sandboxes().compiler.artifact("sha256:" + "0" * 64, order_wasm)
