"""The exports a guest run uses, fetched by index and called with i32 arguments directly.

wasmtime-py's generic path costs a run more host CPU than the guest's own code: `Instance.exports`
wraps every export of the module, and `Func.__call__` asks wasmtime for the function's type and
converts each argument through it on every call. A run needs four exports whose types the
module check fixed when it was loaded (wasm_engine._check_exports and `ExportLayout.of`), so
it fetches only those, by their index, and calls them through the C API of the wasmtime release
pyproject.toml pins. Traps and host-import exceptions surface exactly as through `Func.__call__`
(the same `enter_wasm` turns them into exceptions).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._func import enter_wasm

_NOTHING = (ffi.wasmtime_val_t * 0)()
_I32 = ffi.WASMTIME_I32.value
_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value


def _signature(functype: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(t) for t in functype.params), tuple(str(t) for t in functype.results)


@dataclass(frozen=True, slots=True)
class ExportLayout:
    """Where a module's run exports are among its exports (instances list them in order)."""

    memory: int
    alloc: int
    run: int
    initialize: int | None
    """`_initialize`, when the module exports it as `() -> ()`."""
    initialize_refused: str | None = None
    """Why an `_initialize` export of another kind or type cannot be called."""

    @classmethod
    def of(cls, module: wasmtime.Module) -> ExportLayout:
        """The layout of a module that passed the export check (memory, sf_alloc, sf_run)."""
        index = {export.name: n for n, export in enumerate(module.exports)}
        types = {export.name: export.type for export in module.exports}
        initialize: int | None = None
        refused: str | None = None
        if "_initialize" in types:
            functype = types["_initialize"]
            if isinstance(functype, wasmtime.FuncType) and _signature(functype) == ((), ()):
                initialize = index["_initialize"]
            elif isinstance(functype, wasmtime.FuncType):
                refused = "_initialize must take no arguments and return nothing"
        return cls(index["memory"], index["sf_alloc"], index["sf_run"], initialize, refused)


class RunExports:
    """One instance's run exports."""

    __slots__ = ("_alloc", "_initialize", "_run", "memory")

    def __init__(
        self, instance: wasmtime.Instance, store: wasmtime.Store, layout: ExportLayout
    ) -> None:
        context = store._context()
        self.memory = wasmtime.Memory._from_raw(
            _nth(context, instance, layout.memory, _MEMORY).memory
        )
        self._alloc = _func_nth(context, instance, layout.alloc)
        self._run = _func_nth(context, instance, layout.run)
        self._initialize = (
            None if layout.initialize is None else _func_nth(context, instance, layout.initialize)
        )

    def initialize(self, store: wasmtime.Store) -> None:
        """Call `_initialize` if the module has it."""
        if self._initialize is not None:
            _call(store, self._initialize, (), 0)

    def alloc(self, store: wasmtime.Store, size: int) -> int:
        """`sf_alloc(size)`: the guest's pointer to `size` writable bytes (0: none)."""
        return _call(store, self._alloc, (size,), 1)

    def run(self, store: wasmtime.Store, pointer: int, size: int) -> None:
        """`sf_run(pointer, size)`."""
        _call(store, self._run, (pointer, size), 0)


def _nth(context: object, instance: wasmtime.Instance, index: int, kind: int) -> Any:
    """Export `index` of `instance`, unwrapped (`wasmtime_extern_t.of`): wasmtime-py's
    `wrap_extern` imports its classes at every call, and the functions are called raw."""
    item = ffi.wasmtime_extern_t()
    name = ctypes.POINTER(ctypes.c_char)()
    length = ctypes.c_size_t(0)
    found = ffi.wasmtime_instance_export_nth(
        context,
        ctypes.byref(instance._instance),
        index,
        ctypes.byref(name),
        ctypes.byref(length),
        ctypes.byref(item),
    )
    if not found:
        raise wasmtime.WasmtimeError(f"the instance has no export {index}")
    if int(item.kind) != kind:  # the module check fixed the kinds; a mismatch is a host bug
        raise wasmtime.WasmtimeError(f"export {index} is of kind {item.kind}, not {kind}")
    return item.of


def _func_nth(context: object, instance: wasmtime.Instance, index: int) -> ffi.wasmtime_func_t:
    raw: ffi.wasmtime_func_t = _nth(context, instance, index, _FUNC).func
    return raw


def _i32(value: int) -> ffi.wasmtime_val_t:
    return ffi.wasmtime_val_t(kind=_I32, of=ffi.wasmtime_valunion(i32=value))


def _call(
    store: wasmtime.Store, func: ffi.wasmtime_func_t, args: tuple[int, ...], results: int
) -> int:
    """Call an export of i32 parameters and at most one i32 result; return the result (0
    when it has none)."""
    params = (ffi.wasmtime_val_t * len(args))(*(_i32(value) for value in args))
    out = (ffi.wasmtime_val_t * results)() if results else _NOTHING
    with enter_wasm(store) as trap:
        error = ffi.wasmtime_func_call(
            store._context(), ctypes.byref(func), params, len(args), out, results, trap
        )
        if bool(error):  # a NULL pointer: no error
            raise wasmtime.WasmtimeError._from_ptr(error)
    return int(out[0].of.i32) if results else 0
