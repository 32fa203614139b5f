"""The wasmtime sandbox: module validation, compiled-module cache, limits, the guest ABI."""

from __future__ import annotations

from stepfleet.sandbox.abi import ABI_VERSION, ReplayJournal, encode_replay_buffer
from stepfleet.sandbox.errors import InvalidModule, SandboxError
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.port import GuestRun, Sandbox
from stepfleet.sandbox.runtime import WasmSandbox

__all__ = [
    "ABI_VERSION",
    "GuestRun",
    "InvalidModule",
    "ReplayJournal",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "WasmSandbox",
    "encode_replay_buffer",
]
