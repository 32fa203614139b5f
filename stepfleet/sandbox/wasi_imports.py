"""The inert WASI subset guests may import so that C code links against wasi-libc: stdout and
stderr become log lines; there are no files, environment or arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import wasmtime

from stepfleet.sandbox.abi import WASI_IMPORTS, WASI_MODULE
from stepfleet.sandbox.guest_memory import (
    ADDRESS_SPACE,
    check_range,
    exported_memory,
    log_text,
    u32,
)
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.linking import Violation, define_imports
from stepfleet.sandbox.run_state import RunState

_EBADF = 8
_EINVAL = 28
_MAX_FD_WRITE_IOVS = 64


class WasiImports:
    """The WASI shims, writing to the log lines of the run under way (`current_run()`)."""

    def __init__(self, limits: SandboxLimits, current_run: Callable[[], RunState]) -> None:
        self._limits = limits
        self._current_run = current_run

    def define(self, linker: wasmtime.Linker) -> None:
        define_imports(linker, WASI_MODULE, WASI_IMPORTS, self)

    def fd_write(
        self, caller: wasmtime.Caller, fd: int, iovs: int, count: int, written: int
    ) -> int:
        if fd not in (1, 2):
            return _EBADF
        limits = self._limits
        memory = exported_memory(caller, self._current_run().memory)
        # At most 64 iovs per call; wasi-libc writes the rest in the next call.
        count = min(u32(count), _MAX_FD_WRITE_IOVS)
        iovs = check_range(memory, caller, iovs, 8 * count, "fd_write iovs")
        written = check_range(memory, caller, written, 4, "fd_write result")
        table = bytes(memory.read(caller, iovs, iovs + 8 * count))
        total = 0
        line = bytearray()
        for index in range(count):
            base = int.from_bytes(table[8 * index : 8 * index + 4], "little")
            length = int.from_bytes(table[8 * index + 4 : 8 * index + 8], "little")
            check_range(memory, caller, base, length, f"fd_write iov {index}")
            take = min(length, limits.log_line_bytes - len(line))
            if take > 0:
                line += memory.read(caller, base, base + take)
            total += length
        if total >= ADDRESS_SPACE:
            return _EINVAL  # as writev: the count written would not fit its u32
        logs = self._current_run().logs
        if len(logs) < limits.log_lines_per_run:
            logs.append((1 if fd == 1 else 3, log_text(bytes(line)).rstrip("\n")))
        memory.write(caller, total.to_bytes(4, "little"), written)
        return 0

    def environ_sizes_get(self, caller: wasmtime.Caller, count_ptr: int, size_ptr: int) -> int:
        return _no_entries(caller, count_ptr, size_ptr, "environ_sizes_get")

    def args_sizes_get(self, caller: wasmtime.Caller, count_ptr: int, size_ptr: int) -> int:
        return _no_entries(caller, count_ptr, size_ptr, "args_sizes_get")

    def proc_exit(self, caller: wasmtime.Caller, code: int) -> NoReturn:
        raise Violation(f"guest called proc_exit({code})")

    # The other shims touch no memory, so their pointers need no check.

    def fd_close(self, caller: wasmtime.Caller, fd: int) -> int:
        return _EBADF

    def fd_seek(
        self, caller: wasmtime.Caller, fd: int, offset: int, whence: int, result: int
    ) -> int:
        return _EBADF

    def fd_fdstat_get(self, caller: wasmtime.Caller, fd: int, result: int) -> int:
        return _EBADF

    def environ_get(self, caller: wasmtime.Caller, environ: int, buffer: int) -> int:
        return 0

    def args_get(self, caller: wasmtime.Caller, argv: int, buffer: int) -> int:
        return 0


def _no_entries(caller: wasmtime.Caller, count_ptr: int, size_ptr: int, what: str) -> int:
    """Answer a `*_sizes_get`: no entries, taking no bytes."""
    memory = exported_memory(caller)
    count_ptr = check_range(memory, caller, count_ptr, 4, what)
    size_ptr = check_range(memory, caller, size_ptr, 4, what)
    memory.write(caller, bytes(4), count_ptr)
    memory.write(caller, bytes(4), size_ptr)
    return 0
