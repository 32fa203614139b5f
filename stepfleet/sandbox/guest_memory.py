"""Reading and writing guest memory: every pointer and length the guest hands over is checked
here before the host touches the bytes behind it."""

from __future__ import annotations

from typing import Any

import wasmtime

from stepfleet.sandbox.linking import Violation

ADDRESS_SPACE = 1 << 32
"""Guest pointers and lengths are unsigned 32-bit; a range may not run past 4 GiB."""


def exported_memory(
    caller: wasmtime.Caller, known: wasmtime.Memory | None = None
) -> wasmtime.Memory:
    """The guest's memory: `known` (the run's, once instantiated), else its export."""
    if known is not None:
        return known
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        raise Violation("the module exports no memory")
    return memory


def u32(value: int) -> int:
    """An i32 argument as the unsigned number the guest means (wasmtime hands them signed)."""
    return value & 0xFFFF_FFFF


def check_range(memory: wasmtime.Memory, store: Any, ptr: int, length: int, what: str) -> int:
    """Check that `length` bytes at `ptr` lie in guest memory; return `ptr` as unsigned."""
    ptr, length = u32(ptr), u32(length)
    size = min(memory.data_len(store), ADDRESS_SPACE)
    if ptr + length > size:
        raise Violation(
            f"{what}: pointer range {ptr}+{length} is outside guest memory ({size} bytes)"
        )
    return ptr


def read_text(
    caller: wasmtime.Caller,
    ptr: int,
    length: int,
    limit: int,
    what: str,
    known: wasmtime.Memory | None = None,
) -> str:
    """The UTF-8 text of `length` bytes at `ptr`, at most `limit` bytes of it (`known`: the
    run's memory, see exported_memory)."""
    length = u32(length)
    if length > limit:
        raise Violation(f"{what} is {length} bytes, the limit is {limit}", "output")
    memory = exported_memory(caller, known)
    ptr = check_range(memory, caller, ptr, length, what)
    try:
        return bytes(memory.read(caller, ptr, ptr + length)).decode()
    except UnicodeDecodeError:
        raise Violation(f"{what} is not UTF-8") from None


def no_nul(text: str) -> str:
    """Free text (messages, log lines) keeps its content; a NUL, which text columns and
    terminals cannot carry, becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


def log_text(raw: bytes) -> str:
    """A log line as text: bytes that are not UTF-8, and NULs, become U+FFFD."""
    return no_nul(raw.decode(errors="replace"))
