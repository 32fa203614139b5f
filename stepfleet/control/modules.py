"""Pushing a tenant's module: the checks a worker would make, then the store; audited."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from stepfleet.control.actions import ControlError
from stepfleet.control.audit import operator_name
from stepfleet.control.wasm_thread import on_wasm_thread
from stepfleet.sandbox import (
    CompiledModuleCache,
    CompileFailed,
    CompileLimitExceeded,
    InvalidModule,
    SandboxLimits,
    WasmSandbox,
)
from stepfleet.schemas import TenantLimits, digest_of, is_tenant
from stepfleet.store import AuditEntry, PgStore


class ModuleRefused(ControlError):
    """The module cannot run here: `too_large` when its size is over the tenant's limit."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class ModuleCheckFailed(ControlError):
    """The compiler process failed for a reason that is not the module's: try again."""


@dataclass(frozen=True, slots=True)
class ModuleCache:
    """Where a worker of this host keeps compiled modules (STEPFLEET_MODULE_CACHE_*)."""

    directory: Path | None
    max_bytes: int
    key: SecretStr | str | None = None


@dataclass(frozen=True, slots=True)
class Pushed:
    digest: str
    size_bytes: int
    new: bool = True
    """False when the tenant had these bytes already (nothing changed)."""


def push_limits(fleet: SandboxLimits, own: TenantLimits | None) -> SandboxLimits:
    """The fleet's sandbox limits with the tenant's own module size and memory limits."""
    if own is None:
        return fleet
    return dataclasses.replace(
        fleet,
        module_bytes=own.module_bytes or fleet.module_bytes,
        memory_bytes=own.memory_bytes or fleet.memory_bytes,
    )


def check_push(limits: SandboxLimits, wasm: bytes, cache: ModuleCache | None = None) -> str:
    """Check a module as a push does; return its digest.

    It is compiled fresh, in a child process under the compile limits, must pass the ABI
    checks, and must be able to start within `limits` (the tenant's memory limit, the table
    and instance limits of every run). When the module cache directory exists (a worker of
    this user runs on this host), the compiled artifact is left there, so that worker does
    not compile the module again.

    Raises:
        InvalidModule: refused; CompileLimitExceeded names the compile limit it breached.
        CompileFailed: the compiler process failed for a reason that is not the module's.
    """
    directory = cache.directory if cache is not None else None
    compiled = (
        CompiledModuleCache.open(directory, cache.max_bytes, cache.key)
        if cache is not None and directory is not None and directory.is_dir()
        else None
    )
    digest = digest_of(wasm)
    sandbox = WasmSandbox(limits, module_cache=compiled)
    try:
        sandbox.load(digest, wasm, sandbox.compiler.artifact(digest, wasm, fresh=True))
        sandbox.check_fits(digest, limits.memory_bytes)
    finally:
        sandbox.close()
    return digest


async def push_module(
    store: PgStore,
    tenant: str,
    wasm: bytes,
    *,
    limits: SandboxLimits,
    cache: ModuleCache | None = None,
    actor: str | None = None,
) -> Pushed:
    """Check `wasm` against the fleet's limits and the tenant's own, then store it for the
    tenant (pushing the same bytes again changes nothing).

    Raises:
        ModuleRefused: an invalid module, or one over a limit (`too_large` for its size).
        ModuleCheckFailed: the compiler process failed for a reason that is not the module's.
    """
    if not is_tenant(tenant):
        raise ControlError(f"{tenant!r} is not a tenant name (lower-case letters, digits, - _)")
    record = await store.tenants.get(tenant)
    limits = push_limits(limits, record.limits if record else None)
    if len(wasm) > limits.module_bytes:
        raise ModuleRefused(
            f"module is {len(wasm)} bytes, the limit is {limits.module_bytes}", too_large=True
        )
    try:
        digest = await on_wasm_thread(lambda: check_push(limits, wasm, cache))
    except CompileLimitExceeded as exc:
        raise ModuleRefused(str(exc), too_large=exc.limit == "module-size") from None
    except InvalidModule as exc:
        raise ModuleRefused(str(exc)) from None
    except CompileFailed as exc:
        raise ModuleCheckFailed(str(exc)) from None
    new = await store.put_module(tenant, digest, wasm)
    async with store.control() as tx:
        await tx.audit(
            AuditEntry(
                actor or operator_name(),
                "module-push",
                tenant,
                detail=f"{digest} ({len(wasm)} bytes{'' if new else ', already pushed'})",
            )
        )
    return Pushed(digest, len(wasm), new)
