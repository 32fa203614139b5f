"""How host functions are offered to guests, and the two ways they end a run early."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog
import wasmtime

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

    linker.define_func(module, name, functype, guarded, access_caller=True)
