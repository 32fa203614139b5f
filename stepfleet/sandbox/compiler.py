"""ModuleCompiler: tenant modules compiled under limits, in a child process, off the wasm thread.

Compile time and memory depend on a module's shape more than on its size: 1.5 MB of 50,000
small functions, or one function of a few hundred KiB with thousands of locals, takes seconds
to minutes and gigabytes. So before compiling, a cheap parse of the sections refuses modules
with too many functions, too large a function or too many locals in one; then wasmtime
compiles in a child process (`compile_child.py`) that caps its own CPU time and address space,
and that the parent kills past a wall-clock bound. The child returns `Module.serialize()`; the
parent trusts it (its own child, fed only the tenant's bytes) and seals it into the on-disk
cache, so a worker's wasm thread only deserializes (about a millisecond).

Everything here is thread-safe; `submit` compiles on the compiler's own threads, so the worker's
wasm thread and event loop never wait for a compile.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from stepfleet.sandbox.compile_child import EXIT_INVALID, EXIT_MEMORY
from stepfleet.sandbox.errors import CompileFailed, CompileLimitExceeded, InvalidModule
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.module_cache import CompiledModuleCache
from stepfleet.schemas import digest_of

CHILD = Path(__file__).with_name("compile_child.py")
MAX_CHILDREN = 2
"""Compiler processes one compiler (one worker process) runs at once through `submit`: this
bounds the memory and CPU its compiles take."""
_REFUSALS_KEPT = 1024
_PREAMBLE = b"\x00asm\x01\x00\x00\x00"
_FUNCTION_SECTION = 3
_CODE_SECTION = 10
_REF_TYPES = (0x63, 0x64)
"""Value types followed by a heap type (`ref null ht`, `ref ht`)."""
_STDERR_SHOWN = 300
_CRASHES = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGTRAP}
)
"""Signals a process sends itself when it crashes (as opposed to being stopped from outside)."""


@dataclass(frozen=True, slots=True)
class ModuleShape:
    """What a module asks of the compiler, read from its sections without compiling it."""

    functions: int = 0
    largest_body: tuple[int, int] = (0, 0)
    """(bytes, index in the code section) of the largest function body."""
    most_locals: tuple[int, int] = (0, 0)
    """(locals, index in the code section) of the body declaring the most locals."""


@dataclass(slots=True)
class CompilerStats:
    """What the compiler did since it was made (for tests, benchmarks and logs)."""

    compiled: int = 0
    """Modules compiled by a child process."""
    from_disk: int = 0
    refused: int = 0
    """Refusals, counting those answered from memory."""


def module_shape(wasm: bytes) -> ModuleShape:
    """Count functions, the largest body and the most locals; stop at anything malformed.

    Malformed bytes are not refused here: wasmtime says what is wrong with them when it compiles.
    """
    functions = 0
    largest, most = (0, 0), (0, 0)
    if not wasm.startswith(_PREAMBLE):
        return ModuleShape()
    reader = _Reader(wasm, len(_PREAMBLE))
    try:
        while reader.position < len(wasm):
            section = reader.byte()
            size = reader.leb()
            end = reader.position + size
            if section == _FUNCTION_SECTION:
                functions = max(functions, reader.leb())
            elif section == _CODE_SECTION:
                count = reader.leb()
                functions = max(functions, count)
                for index in range(count):
                    body = reader.leb()
                    following = reader.position + body
                    largest = max(largest, (body, index))
                    most = max(most, (_locals(_Reader(wasm, reader.position, following)), index))
                    reader.position = following
            reader.position = end
    except _Malformed:
        pass
    return ModuleShape(functions, largest, most)


def check_shape(wasm: bytes, limits: SandboxLimits) -> None:
    """Refuse, naming the limit, a module too large or too costly to compile by its shape."""
    if len(wasm) > limits.module_bytes:
        raise CompileLimitExceeded(
            f"module is {len(wasm)} bytes, the limit is {limits.module_bytes}", "module-size"
        )
    shape = module_shape(wasm)
    if shape.functions > limits.module_functions:
        raise CompileLimitExceeded(
            f"module defines {shape.functions} functions, the limit is "
            f"{limits.module_functions} (STEPFLEET_MODULE_FUNCTIONS)",
            "functions",
        )
    size, index = shape.largest_body
    if size > limits.function_body_bytes:
        raise CompileLimitExceeded(
            f"function body #{index} of the module is {size} bytes of code, the limit is "
            f"{limits.function_body_bytes} (STEPFLEET_FUNCTION_BODY_BYTES)",
            "function-size",
        )
    count, index = shape.most_locals
    if count > limits.function_locals:
        raise CompileLimitExceeded(
            f"function body #{index} of the module declares {count} locals, the limit is "
            f"{limits.function_locals} (STEPFLEET_FUNCTION_LOCALS)",
            "locals",
        )


class ModuleCompiler:
    """Compiles modules for one engine configuration under one set of limits."""

    def __init__(
        self,
        engine_options: Mapping[str, bool | int | str],
        limits: SandboxLimits,
        *,
        fingerprint: str,
        cache: CompiledModuleCache | None = None,
        max_children: int = MAX_CHILDREN,
    ) -> None:
        self.limits = limits
        self.stats = CompilerStats()
        self._options = dict(engine_options)
        self._fingerprint = fingerprint
        self._cache = cache
        self._command = [sys.executable, "-I", str(CHILD)]
        # A child that got less CPU than its limit in this long was starved, not too costly.
        self._wall_seconds = 2.0 * limits.compile_timeout_seconds + 5.0
        # Its threads only wait for compiler processes: at most `max_children` run at once.
        self._pool = ThreadPoolExecutor(max_children, thread_name_prefix="compile")
        self._lock = threading.Lock()
        self._running: dict[str, Future[bytes]] = {}
        self._refused: OrderedDict[str, InvalidModule] = OrderedDict()

    def submit(self, digest: str, wasm: bytes, *, fresh: bool = False) -> Future[bytes]:
        """Start making the serialized module `digest` on the compiler's own threads.

        The future's result is the artifact for `WasmSandbox.load`, read from the disk cache
        when it holds it (unless `fresh`), else compiled and sealed into the cache. A module
        being made already is not made twice; a refusal is remembered, so the module's other
        instances are refused without compiling it again.

        Its exception: InvalidModule (CompileLimitExceeded names the compile limit) or
        CompileFailed (the compiler process failed: try again; not remembered).

        Raises:
            InvalidModule: the bytes do not hash to `digest`.
        """
        if digest_of(wasm) != digest:
            raise InvalidModule(f"module bytes do not hash to {digest}")
        with self._lock:
            refusal = self._refused.get(digest)
            if refusal is not None:
                self.stats.refused += 1
                refused: Future[bytes] = Future()
                refused.set_exception(_again(refusal))
                return refused
            running = self._running.get(digest)
            if running is None:
                running = self._pool.submit(self._make, digest, wasm, fresh)
                self._running[digest] = running
            return running

    def artifact(self, digest: str, wasm: bytes, *, fresh: bool = False) -> bytes:
        """`submit`, then wait for the artifact (or raise its exception)."""
        return self.submit(digest, wasm, fresh=fresh).result()

    def compile(self, wasm: bytes) -> bytes:
        """Check the module's shape, then compile it in a child process; return the artifact.

        Raises:
            InvalidModule: not a module (wasmtime's message); CompileLimitExceeded past a limit.
            CompileFailed: the compiler process failed for a reason that is not the module's.
        """
        check_shape(wasm, self.limits)
        artifact = self._run_child(wasm)
        self.stats.compiled += 1
        return artifact

    def _make(self, digest: str, wasm: bytes, fresh: bool) -> bytes:
        try:
            return self._artifact(digest, wasm, fresh=fresh)
        except InvalidModule as exc:
            self.stats.refused += 1
            with self._lock:
                # A copy: the raised one's traceback would keep the module's bytes alive.
                self._refused[digest] = _again(exc)
                while len(self._refused) > _REFUSALS_KEPT:
                    self._refused.popitem(last=False)
            raise
        finally:
            with self._lock:
                del self._running[digest]

    def _artifact(self, digest: str, wasm: bytes, *, fresh: bool) -> bytes:
        cache = self._cache
        if cache is not None and not fresh:
            # Checked on disk hits too, so that lowering a shape limit takes effect at once.
            check_shape(wasm, self.limits)
            found = cache.read_artifact(self._fingerprint, digest)
            if found is not None:
                self.stats.from_disk += 1
                return found
        artifact = self.compile(wasm)
        if cache is not None:
            cache.store_artifact(self._fingerprint, digest, artifact)
        return artifact

    def _run_child(self, wasm: bytes) -> bytes:
        limits = self.limits
        spec = json.dumps(
            {
                "options": self._options,
                "cpu_seconds": limits.compile_timeout_seconds,
                "memory_bytes": limits.compile_memory_bytes,
            }
        )
        try:
            child = subprocess.Popen(
                [*self._command, spec],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise CompileFailed(f"the compiler process could not start: {exc}") from None
        try:
            out, err = child.communicate(wasm, timeout=self._wall_seconds)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise CompileFailed(
                f"the compiler process did not finish in {self._wall_seconds:g} s of wall-clock "
                f"time without reaching its CPU limit: the host is too busy, try again"
            ) from None
        code = child.returncode
        if code == 0:
            return out
        if code == EXIT_INVALID:
            first = out.decode(errors="replace").strip().splitlines()
            raise InvalidModule(f"not a valid WebAssembly module: {first[0] if first else code}")
        if code == EXIT_MEMORY or (code == -signal.SIGABRT and b"memory allocation of" in err):
            raise CompileLimitExceeded(
                f"compiling the module needs more than {limits.compile_memory_bytes} bytes "
                "of memory, the compile memory limit (STEPFLEET_COMPILE_MEMORY_BYTES)",
                "compile-memory",
            )
        if code == -signal.SIGXCPU:
            raise CompileLimitExceeded(
                f"compiling the module takes more than {limits.compile_timeout_seconds} s of "
                "CPU, the compile time limit (STEPFLEET_COMPILE_TIMEOUT_SECONDS)",
                "compile-time",
            )
        detail = err.decode(errors="replace").strip()[-_STDERR_SHOWN:] or "no message"
        if -code in _CRASHES:
            # wasmtime crashed on these bytes: it would crash again, so it is a refusal.
            raise InvalidModule(f"the compiler crashed on this module (signal {-code}): {detail}")
        # Stopped from outside (the OOM killer, a service manager's SIGTERM) or a broken install.
        raise CompileFailed(f"the compiler process failed (exit {code}): {detail}")


def _again(refusal: InvalidModule) -> InvalidModule:
    """A fresh exception carrying a remembered refusal (exceptions keep their traceback)."""
    if isinstance(refusal, CompileLimitExceeded):
        return CompileLimitExceeded(str(refusal), refusal.limit)
    return InvalidModule(str(refusal))


class _Malformed(Exception):
    pass


class _Reader:
    """LEB128 and bytes from `data[position:end]`."""

    __slots__ = ("data", "end", "position")

    def __init__(self, data: bytes, position: int, end: int | None = None) -> None:
        self.data = data
        self.position = position
        self.end = len(data) if end is None else min(end, len(data))

    def byte(self) -> int:
        if self.position >= self.end:
            raise _Malformed
        value = self.data[self.position]
        self.position += 1
        return value

    def leb(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 35:
                raise _Malformed


def _locals(body: _Reader) -> int:
    """The locals a function body declares (its groups' counts summed)."""
    total = 0
    try:
        for _ in range(body.leb()):
            total += body.leb()
            if body.byte() in _REF_TYPES:
                body.leb()
    except _Malformed:
        pass
    return total
