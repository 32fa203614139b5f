"""The wasmtime sandbox: module validation, compiled-module cache, limits, the guest ABI."""

from __future__ import annotations

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
