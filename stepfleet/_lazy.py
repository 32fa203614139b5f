"""Package exports imported on first use, so a command loads only the libraries it needs."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, origins: Mapping[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package` that imports each name from its module in
    `origins` when it is first asked for (PEP 562), and keeps it on the package.

    The package imports the same names under `if TYPE_CHECKING:` for type checkers.
    """

    def __getattr__(name: str) -> object:
        origin = origins.get(name)
        if origin is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(origin), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
