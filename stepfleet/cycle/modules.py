"""Loading the modules a batch needs into the sandbox.

Compiling (or reading the disk cache) runs on the compiler's threads, in a child process
under the compile limits, so other batches' guests run meanwhile; the guest thread only
deserializes. A refused module's works come back as crashed runs that name the reason, so
their instances end with it and the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import structlog

from stepfleet.cycle.work import H, Ran, Work
from stepfleet.observe import NO_OBSERVER, Observer
from stepfleet.sandbox import CompileLimitExceeded, InvalidModule, Sandbox
from stepfleet.schemas import GuestCrashed, GuestReport
from stepfleet.store.port import StepTx

log = structlog.get_logger("stepfleet.worker")

T = TypeVar("T")
OnGuestThread = Callable[[Callable[[], T]], Awaitable[T]]
"""Runs a function on the thread that drives the sandbox, and awaits its result."""


class ModuleLoader:
    """Loads modules into one sandbox; shared by every cycle of a process."""

    def __init__(
        self,
        sandbox: Sandbox,
        on_guest_thread: OnGuestThread[None],
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self._sandbox = sandbox
        self._on_guest_thread = on_guest_thread
        self._observer = observer

    async def load(
        self, tx: StepTx, admitted: list[Work[H]], now: datetime
    ) -> tuple[list[Work[H]], list[Ran[H]]]:
        """Load the modules `admitted` needs; return the works to run and the refused ones."""
        needed = {w.module for w in admitted}
        missing = {m for m in needed if not self._sandbox.is_loaded(m)}
        self._observer.modules(len(needed) - len(missing), len(missing))
        if not missing:
            return admitted, []
        stored = await tx.module_bytes(missing)
        tenants: dict[str, set[str]] = {}
        for work in admitted:
            tenants.setdefault(work.module, set()).add(work.key.tenant)
        outcomes = await asyncio.gather(
            *(self._load_one(d, w, sorted(tenants[d])) for d, w in stored.items())
        )
        refused = {d: crash for d, crash in zip(stored, outcomes, strict=True) if crash}
        if not refused:
            return admitted, []
        crashed = [
            Ran(w, GuestReport(refused[w.module], (), []), now, now)
            for w in admitted
            if w.module in refused
        ]
        return [w for w in admitted if w.module not in refused], crashed

    async def _load_one(self, digest: str, wasm: bytes, tenants: list[str]) -> GuestCrashed | None:
        """Load one module; None when loaded, else the crash its refusal means for its runs."""
        started = time.perf_counter()
        try:
            artifact = await asyncio.wrap_future(self._sandbox.compiler.submit(digest, wasm))
            await self._on_guest_thread(lambda: self._sandbox.load(digest, wasm, artifact))
        except InvalidModule as exc:
            limit = exc.limit if isinstance(exc, CompileLimitExceeded) else None
            for tenant in tenants:
                log.warning(
                    "module_refused",
                    tenant=tenant,
                    module_digest=digest,
                    limit=limit,
                    error=str(exc),
                )
            return GuestCrashed(f"module {digest} refused: {exc}", limit)
        seconds = time.perf_counter() - started
        self._observer.module_loaded(seconds)
        ms = round(seconds * 1000, 2)
        for tenant in tenants:
            log.info("module_loaded", tenant=tenant, module_digest=digest, ms=ms)
        return None
