"""The wasmtime sandbox: module validation, compiled-module cache, limits, the guest ABI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
    from stepfleet.sandbox.abi import ABI_VERSION, ReplayJournal, encode_replay_buffer
    from stepfleet.sandbox.compiler import ModuleCompiler
    from stepfleet.sandbox.errors import (
        CompileFailed,
        CompileLimitExceeded,
        GuestProcessLost,
        InvalidModule,
        SandboxError,
    )
    from stepfleet.sandbox.guest_pool import GuestProcessPool
    from stepfleet.sandbox.limits import SandboxLimits
    from stepfleet.sandbox.module_cache import CompiledModuleCache, UnsafeCacheDirectory
    from stepfleet.sandbox.port import GuestRun, LongRuns, Sandbox
    from stepfleet.sandbox.runtime import WasmSandbox

__all__ = [
    "ABI_VERSION",
    "CompileFailed",
    "CompileLimitExceeded",
    "CompiledModuleCache",
    "GuestProcessLost",
    "GuestProcessPool",
    "GuestRun",
    "InvalidModule",
    "LongRuns",
    "ModuleCompiler",
    "ReplayJournal",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "UnsafeCacheDirectory",
    "WasmSandbox",
    "encode_replay_buffer",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "ABI_VERSION": "stepfleet.sandbox.abi",
        "ReplayJournal": "stepfleet.sandbox.abi",
        "encode_replay_buffer": "stepfleet.sandbox.abi",
        "ModuleCompiler": "stepfleet.sandbox.compiler",
        "CompileFailed": "stepfleet.sandbox.errors",
        "CompileLimitExceeded": "stepfleet.sandbox.errors",
        "GuestProcessLost": "stepfleet.sandbox.errors",
        "GuestProcessPool": "stepfleet.sandbox.guest_pool",
        "InvalidModule": "stepfleet.sandbox.errors",
        "SandboxError": "stepfleet.sandbox.errors",
        "SandboxLimits": "stepfleet.sandbox.limits",
        "CompiledModuleCache": "stepfleet.sandbox.module_cache",
        "UnsafeCacheDirectory": "stepfleet.sandbox.module_cache",
        "GuestRun": "stepfleet.sandbox.port",
        "LongRuns": "stepfleet.sandbox.port",
        "Sandbox": "stepfleet.sandbox.port",
        "WasmSandbox": "stepfleet.sandbox.runtime",
    },
)
