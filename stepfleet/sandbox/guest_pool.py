"""GuestProcessPool: a worker's long guest runs, in a few processes of lower CPU priority.

A guest that needs seconds of fuel held the worker's one guest thread, and with it every other
tenant's long runs and (through the turn the process's pipelines take at the sandbox) its short
ones. Here each of `processes` slots owns one guest process (`guest_child.py`), started with a
higher niceness, so the worker's event loop, and the short runs it makes inline, keep the CPU
while long runs go on beside them.

Runs wait in one queue per tenant, and the slots take from the tenants in turn: a tenant with
many long runs queued delays another tenant's by at most one run per slot. A run is data in
(`GuestRun` and, the first time a process meets the module, its serialized artifact), data out
(`GuestReport`, with the guest's log lines), so the process needs nothing else. It keeps every
limit itself (fuel, memory, the host-call cap, and the run and step timeouts through its own
epoch ticker); a process that dies, or has not answered within the run timeout plus
`GRACE_SECONDS`, is killed, its run fails as a crashed run (`GuestCrashed`), and the slot starts
a new process for its next run.

Answers are unpickled with only `stepfleet.schemas` classes allowed: the process runs
untrusted code, even if inside wasmtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from stepfleet.sandbox.errors import GuestProcessLost
from stepfleet.sandbox.guest_frames import FRAME, MAX_FRAME, frame
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.port import GuestRun
from stepfleet.schemas import GuestCrashed, GuestReport

log = structlog.get_logger("stepfleet.sandbox")

NICENESS = 10
"""Added to a guest process's niceness: it gets about a tenth of a core its worker wants."""
GRACE_SECONDS = 30.0
"""How long past the run timeout a guest process may take to answer before it is killed."""
_START_SECONDS = 60.0
_STDERR_SHOWN = 300
_ALLOWED_MODULES = "stepfleet.schemas."
_CRASHES = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGTRAP}
)
"""Signals a process sends itself when it crashes (as opposed to being stopped from outside)."""


class LoadedModules(Protocol):
    """What the pool needs of the worker's sandbox (`WasmEngine`)."""

    limits: SandboxLimits

    def artifact_of(self, digest: str) -> Callable[[], bytes]: ...


@dataclass(slots=True)
class PoolStats:
    """What the pool did since it was made (for tests, benchmarks and logs)."""

    runs: int = 0
    started: int = 0
    """Guest processes started, counting replacements."""
    died: int = 0
    killed: int = 0
    """Processes killed for not answering in time."""


@dataclass(slots=True)
class _Job:
    run: GuestRun
    artifact: Callable[[], bytes]
    future: Future[GuestReport] = field(default_factory=Future)


class GuestProcessPool:
    """Runs long guest runs in `processes` guest processes, fairly across tenants."""

    def __init__(
        self,
        sandbox: LoadedModules,
        processes: int,
        *,
        niceness: int = NICENESS,
        log_level: str = "info",
        log_format: str = "json",
        grace_seconds: float = GRACE_SECONDS,
    ) -> None:
        if processes < 1:
            raise ValueError("a guest process pool needs at least one process")
        self.stats = PoolStats()
        self._artifact_of = sandbox.artifact_of
        self.limits = sandbox.limits
        self._bound = self.limits.run_timeout_ms / 1000 + grace_seconds
        self._spec = json.dumps(
            {
                "limits": dataclasses.asdict(self.limits),
                "niceness": niceness,
                "log_level": log_level,
                "log_format": log_format,
            }
        )
        self._command = [sys.executable, "-I", "-m", "stepfleet.sandbox.guest_child"]
        self._lock = threading.Condition()
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._closed = False
        self._slots = [_Slot(self, index) for index in range(processes)]
        self._threads: list[threading.Thread] = []

    def submit(self, job: GuestRun) -> Future[GuestReport]:
        """Queue `job`; see `LongRuns.submit`.

        Raises:
            KeyError: `job.digest` is not loaded in the sandbox.
            RuntimeError: the pool is closed.
        """
        queued = _Job(job, self._artifact_of(job.digest))
        with self._lock:
            if self._closed:
                raise RuntimeError("the guest process pool is closed")
            self._queues.setdefault(job.tenant, deque()).append(queued)
            if not self._threads:
                self._start_threads()
            self._lock.notify()
        return queued.future

    def pids(self) -> list[int]:
        """The process ids of the guest processes running now."""
        return [child.pid for slot in self._slots if (child := slot.child) is not None]

    def close(self) -> None:
        """Cancel the queued runs and stop the processes (a run under way raises
        GuestProcessLost)."""
        with self._lock:
            self._closed = True
            queued = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._lock.notify_all()
        for job in queued:
            job.future.cancel()
        for slot in self._slots:
            slot.stop()

    def _start_threads(self) -> None:
        for slot in self._slots:
            thread = threading.Thread(target=slot.serve, name=f"guest-{slot.index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _next(self) -> _Job | None:
        """The next run, the tenants taking turns; None once the pool is closed."""
        with self._lock:
            while not self._closed and not self._queues:
                self._lock.wait()
            if self._closed:
                return None
            tenant, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            if queue:
                self._queues.move_to_end(tenant)
            else:
                del self._queues[tenant]
            return job


class _Slot:
    """One guest process and the thread that feeds it, one run at a time."""

    def __init__(self, pool: GuestProcessPool, index: int) -> None:
        self.index = index
        self._pool = pool
        self.child: subprocess.Popen[bytes] | None = None
        self._held: OrderedDict[str, None] = OrderedDict()
        """The modules the process holds, in its LRU order (mirrored, see guest_child.py)."""

    def serve(self) -> None:
        while (job := self._pool._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                report = self._run(job)
            except Exception as exc:  # a host bug: the run's batch sees it
                job.future.set_exception(exc)
            else:
                self._pool.stats.runs += 1
                job.future.set_result(report)

    def stop(self) -> None:
        child, self.child = self.child, None
        if child is not None:
            _end(child)

    def _start(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [*self._pool._command, self._pool._spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            ready = _read_frame(child, time.monotonic() + _START_SECONDS)
        except (OSError, EOFError, ValueError, _Late) as exc:
            _end(child)
            raise GuestProcessLost(f"the guest process did not start: {exc!r}") from None
        if ready != b"ready":
            _end(child)
            raise GuestProcessLost("the guest process did not start")
        self.child = child
        self._held.clear()
        self._pool.stats.started += 1
        log.info("guest_process_started", pid=child.pid, slot=self.index)
        return child

    def _run(self, job: _Job) -> GuestReport:
        run = job.run
        try:
            child = self.child or self._start()
        except OSError as exc:
            log.error("guest_process_failed_to_start", error=str(exc), **_context(run))
            return GuestReport(GuestCrashed(f"host error: no guest process: {exc}"))
        artifact: bytes | None = None
        if run.digest in self._held:
            self._held.move_to_end(run.digest)
        else:
            artifact = job.artifact()
        request = frame(pickle.dumps((run, artifact), protocol=pickle.HIGHEST_PROTOCOL))
        began = time.monotonic()
        try:
            assert child.stdin is not None
            child.stdin.write(request)
            child.stdin.flush()
            answer = _read_frame(child, began + self._pool._bound)
        except (OSError, EOFError, ValueError, _Late) as exc:
            return self._failed(child, run, exc)
        try:
            held, report = _SchemasOnly(io.BytesIO(answer)).load()
        except Exception as exc:  # anything the answer's bytes make the unpickler raise
            return self._failed(child, run, exc)
        if not isinstance(report, GuestReport):
            return self._failed(child, run, ValueError("the answer is not a report"))
        if held:
            self._held[run.digest] = None
            self._held.move_to_end(run.digest)
            while len(self._held) > self._pool.limits.compiled_cache_entries:
                self._held.popitem(last=False)
        else:
            self._held.pop(run.digest, None)
        return report

    def _failed(
        self, child: subprocess.Popen[bytes], run: GuestRun, cause: BaseException
    ) -> GuestReport:
        """End the process after a broken exchange; the run fails as crashed."""
        self.child = None
        late = isinstance(cause, _Late)
        _end(child)
        code = child.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
        if late:
            self._pool.stats.killed += 1
            log.error(
                "guest_process_killed",
                pid=child.pid,
                seconds=round(self._pool._bound),
                **_context(run),
            )
            return GuestReport(
                GuestCrashed(
                    f"the guest process did not finish the run in {self._pool._bound:g} s "
                    "and was stopped",
                    "timeout",
                )
            )
        if self._pool._closed:
            # Stopped by close() (the worker is stopping): the delivery comes again, no fault.
            log.info("guest_run_stopped", pid=child.pid, reason="pool closed", **_context(run))
            raise GuestProcessLost("the worker stopped during the run: try again")
        self._pool.stats.died += 1
        log.error("guest_process_died", pid=child.pid, how=how, error=str(cause), **_context(run))
        if code is not None and -code in _CRASHES:
            # wasmtime crashed running this guest: it would crash again, like a trap.
            return GuestReport(GuestCrashed(f"the guest process crashed during the run ({how})"))
        # Stopped from outside (the OOM killer, an operator): not the guest's doing.
        raise GuestProcessLost(f"the guest process ended during the run ({how}): try again")


class _Late(Exception):
    pass


def _context(run: GuestRun) -> dict[str, str]:
    return {"tenant": run.tenant, "instance": run.instance, "module_digest": run.digest}


def _end(child: subprocess.Popen[bytes]) -> None:
    """Kill and reap a guest process, closing its pipes."""
    with contextlib.suppress(OSError):
        child.kill()
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    child.wait()


def _read_frame(child: subprocess.Popen[bytes], deadline: float) -> bytes:
    """Read one answer from the process before `deadline` (monotonic seconds)."""
    assert child.stdout is not None
    fd = child.stdout.fileno()
    head = _read_exactly(fd, FRAME.size, deadline)
    (size,) = FRAME.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"an answer of {size} bytes is past the limit")
    return _read_exactly(fd, size, deadline)


def _read_exactly(fd: int, size: int, deadline: float) -> bytes:
    parts: list[bytes] = []
    left = size
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise _Late
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            continue
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the guest process closed its answers")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class _SchemasOnly(pickle.Unpickler):
    """Unpickles reports: the outcome classes of `stepfleet.schemas` and plain values only."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_ALLOWED_MODULES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a guest's answer")
