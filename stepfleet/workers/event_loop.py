"""The worker's event loop: urgent callbacks first, and the others in short turns.

A worker runs every tenant's batches on one asyncio loop, and a plain loop runs, in each
iteration, every callback that was ready when the iteration began, then polls its sockets. With
a flood's batches on the loop an iteration took 10-40 ms, and a light tenant's step needs about
ten of them (its delivery read from the socket, handed to the inbox, the light batch woken, each
database round trip resumed): measured, a quiet tenant's delivery reached the worker's inbox
45 ms after RabbitMQ confirmed it (p90) while the broker itself delivered within 3 ms.

So this loop keeps two queues. *Urgent* callbacks are socket readiness (cheap: they wake a
future) and those of tasks running in a context where `URGENT` is set: the broker connection's
readers and consumers, and the light pipeline (see cycle/priority.py). They run before any
other callback that is ready, whenever they became ready. The others run in turns: once they
have had `TURN_SECONDS` of an iteration, the rest wait for the next one, after the sockets were
polled, so a callback that holds the loop delays urgent work by its own length, not by the sum
of all. Each queue keeps its order (asyncio's promise holds within each). Urgent work ends by
itself (a delivery read, a light batch waiting on its database), and should it keep coming,
one of the others runs whenever they have waited `STARVED_SECONDS`, so nothing starves.

Where the loop is a plain asyncio loop (tests, the local runner) `URGENT` changes nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

URGENT: contextvars.ContextVar[bool] = contextvars.ContextVar("urgent", default=False)
"""Set in a task's context: its callbacks run before the loop's other ready callbacks."""

TURN_SECONDS = 0.002
"""How long an iteration may run the other callbacks before the loop polls its sockets."""
STARVED_SECONDS = 0.05
"""How long the other callbacks wait at most while urgent ones keep coming."""


def urgent_context() -> contextvars.Context:
    """A copy of the current context with `URGENT` set: tasks created in it (and the tasks
    they create) run as urgent."""
    context = contextvars.copy_context()
    context.run(URGENT.set, True)
    return context


async def run_urgent(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` as a task of its own in an urgent context."""
    return await asyncio.get_running_loop().create_task(coro, context=urgent_context())


class _ReadyQueue:
    """The loop's `_ready` deque, as two: urgent callbacks first, then a turn of the others.

    The base loop appends to it, takes its length at the start of an iteration and pops that
    many. Urgent callbacks are popped first, unless the others have waited `STARVED_SECONDS`
    (an urgent task that keeps rescheduling itself cannot hold them off for good). Once an
    iteration is `TURN_SECONDS` old and one of the others ran, `popleft` hands out a cancelled
    handle, which the loop skips: the iteration ends and the rest wait for the next one."""

    def __init__(self, skip: asyncio.Handle) -> None:
        self._urgent: deque[asyncio.Handle] = deque()
        self._others: deque[asyncio.Handle] = deque()
        self._skip = skip
        self._turn_began = 0.0
        self._others_ran = False
        self._others_served = 0.0
        """When one of the others last ran, or began to wait."""

    def __len__(self) -> int:
        """The size; the base loop asks once an iteration, for the number it will pop."""
        self._turn_began = time.perf_counter()
        self._others_ran = False
        return len(self._urgent) + len(self._others)

    def __bool__(self) -> bool:
        return bool(self._urgent) or bool(self._others)

    def append(self, handle: asyncio.Handle) -> None:
        context: contextvars.Context | None = getattr(handle, "_context", None)
        if context is not None and context.get(URGENT, False):
            self._urgent.append(handle)
            return
        if not self._others:
            self._others_served = time.perf_counter()
        self._others.append(handle)

    def append_urgent(self, handle: asyncio.Handle) -> None:
        self._urgent.append(handle)

    def popleft(self) -> asyncio.Handle:
        now = time.perf_counter()
        if self._urgent and (not self._others or now - self._others_served < STARVED_SECONDS):
            return self._urgent.popleft()
        if self._others_ran and now - self._turn_began > TURN_SECONDS:
            return self._skip
        self._others_ran = True
        self._others_served = now
        return self._others.popleft()

    def clear(self) -> None:
        self._urgent.clear()
        self._others.clear()


class WorkerEventLoop(asyncio.SelectorEventLoop):
    """A selector event loop that runs urgent callbacks first (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        skip = asyncio.Handle(lambda: None, (), self)
        skip.cancel()
        self._ready = _ReadyQueue(skip)

    def _add_callback(self, handle: asyncio.Handle) -> None:
        """Socket readiness (and signals): urgent, whoever registered it."""
        if not handle._cancelled:
            self._ready.append_urgent(handle)
