"""How host functions are offered to guests, and the two ways they end a run early."""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import structlog
import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import _func as wasmtime_func
from wasmtime._func import Caller

from stepfleet.schemas import RunOutcome

log = structlog.get_logger("stepfleet.sandbox")

Signature = tuple[tuple[str, ...], tuple[str, ...]]
"""An import's (params, results), as the guest ABI tables in abi.py spell them."""

_VALTYPES = {
    "i32": wasmtime.ValType.i32(),
    "i64": wasmtime.ValType.i64(),
}


class Stop(BaseException):
    """Raised by a terminal import to unwind the guest; carries the run's outcome.

    A BaseException so that nothing between the import and `run` mistakes it for a failure.
    """

    def __init__(self, outcome: RunOutcome) -> None:
        self.outcome = outcome


class Violation(Exception):
    """The guest broke the ABI (bad pointer, bad UTF-8, bad JSON, over a size limit)."""

    def __init__(self, message: str, limit: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.where = where
        """What failed, when the host knows better than the run's state (see GuestCrashed)."""


def define_imports(
    linker: wasmtime.Linker, module: str, signatures: Mapping[str, Signature], imports: object
) -> None:
    """Offer guests each import `signatures` names, served by the method of `imports` so named."""
    for name, signature in signatures.items():
        _define(linker, module, name, signature, getattr(imports, name))


def _define(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    signature: Signature,
    func: Callable[..., Any],
) -> None:
    """Offer `func` to guests as `module.name`; it is called with the caller first."""
    params, results = signature
    functype = wasmtime.FuncType([_VALTYPES[p] for p in params], [_VALTYPES[r] for r in results])
    where = f"{module}.{name}"

    def guarded(*args: Any) -> Any:
        try:
            return func(*args)
        except Violation:
            raise
        except Exception as exc:
            # The checks in the imports should leave nothing to reach here; if something does,
            # it fails this run, named, instead of escaping into the worker's batch.
            log.exception("host_import_failed", host_import=where)
            raise Violation(f"host error in {where}: {type(exc).__name__}") from None

    served = next(_SERVED_IDS)
    wide = tuple(p == "i64" for p in params)
    _SERVED[served] = (guarded, wide, None if not results else results[0] == "i64")
    module_bytes, name_bytes = module.encode(), name.encode()
    error = ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(),
        ctypes.create_string_buffer(module_bytes),
        len(module_bytes),
        ctypes.create_string_buffer(name_bytes),
        len(name_bytes),
        functype.ptr(),
        _serve,
        served,
        _NO_FINALIZER,
    )
    if bool(error):  # a NULL pointer: no error
        raise wasmtime.WasmtimeError._from_ptr(error)


_SERVED: dict[int, tuple[Callable[..., Any], tuple[bool, ...], bool | None]] = {}
"""Each defined import: its function, which parameters are i64, and whether its one result
is an i64 (None: no result). Kept for the process's life, as its linkers are (one sandbox per
process): a finalizer would be a Python callback that a linker freed at interpreter exit
calls after the module holding it is gone."""
_SERVED_IDS = itertools.count(1)
_NO_FINALIZER = ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p))  # NULL


@ffi.wasmtime_func_unchecked_callback_t  # type: ignore[untyped-decorator]
def _serve(served: int, caller_ptr: Any, values: Any, _count: int) -> int | None:
    """Serve an import from the raw values wasmtime hands over (results go in their place).

    wasmtime-py's own trampoline makes a `Val` of each argument and converts the result
    through a freshly made type, per call; the signatures here are fixed when defined. An
    exception becomes a trap that `enter_wasm` raises again, as that trampoline does.
    """
    caller = Caller(caller_ptr)
    try:
        func, wide, result_wide = _SERVED[served]
        args = [values[n].i64 if is_wide else values[n].i32 for n, is_wide in enumerate(wide)]
        result = func(caller, *args)
        if result_wide is not None:
            if result_wide:
                values[0].i64 = result
            else:
                values[0].i32 = result
        return 0
    except BaseException as exc:
        # A BaseException too (Stop), as wasmtime-py's own trampoline stores them.
        wasmtime_func.LAST_EXCEPTION = exc  # type: ignore[assignment]
        trap = wasmtime.Trap("python exception")._consume()
        value: int | None = ctypes.cast(trap, ctypes.c_void_p).value
        return value
    finally:
        caller._invalidate()
