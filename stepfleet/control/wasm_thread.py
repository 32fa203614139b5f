"""The one thread of this process where control drives wasmtime (module checks and dry-run
replays): wasmtime-py is not thread-safe, and these calls take long enough that they must not
run on the event loop of a process that serves others (the HTTP API)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_THREAD = ThreadPoolExecutor(1, thread_name_prefix="control-wasm")


async def on_wasm_thread(call: Callable[[], T]) -> T:
    """Run `call` on control's wasmtime thread and await its result."""
    return await asyncio.get_running_loop().run_in_executor(_THREAD, call)
