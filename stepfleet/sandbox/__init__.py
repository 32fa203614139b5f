"""The wasmtime sandbox: module validation, compiled-module cache, limits, the guest ABI."""

from __future__ import annotations

from stepfleet.sandbox.abi import ABI_VERSION, ReplayJournal, encode_replay_buffer
from stepfleet.sandbox.compiler import ModuleCompiler
from stepfleet.sandbox.errors import (
    CompileFailed,
    CompileLimitExceeded,
    InvalidModule,
    SandboxError,
)
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.module_cache import CompiledModuleCache, UnsafeCacheDirectory
from stepfleet.sandbox.port import GuestRun, Sandbox
from stepfleet.sandbox.runtime import WasmSandbox

__all__ = [
    "ABI_VERSION",
    "CompileFailed",
    "CompileLimitExceeded",
    "CompiledModuleCache",
    "GuestRun",
    "InvalidModule",
    "ModuleCompiler",
    "ReplayJournal",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "UnsafeCacheDirectory",
    "WasmSandbox",
    "encode_replay_buffer",
]
