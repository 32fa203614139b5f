"""The worker's event loop: urgent callbacks first, the others in short turns with the sockets
polled between them, each queue in order, and nothing starved."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from stepfleet.cli.common import run
from stepfleet.workers.event_loop import (
    STARVED_SECONDS,
    TURN_SECONDS,
    URGENT,
    WorkerEventLoop,
    run_urgent,
    urgent_context,
)


def on_worker_loop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=WorkerEventLoop) as runner:
        return runner.run(main())


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_urgent_callbacks_run_before_the_others_and_each_keeps_its_order():
    order: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(3):
            loop.call_soon(order.append, f"other{i}")
        for i in range(3):
            loop.call_soon(order.append, f"urgent{i}", context=urgent_context())
        await asyncio.sleep(0.01)

    on_worker_loop(main)
    assert order == ["urgent0", "urgent1", "urgent2", "other0", "other1", "other2"]


def test_a_task_in_an_urgent_context_goes_ahead_of_ready_work():
    order: list[str] = []

    async def step(name: str, n: int) -> None:
        for i in range(n):
            order.append(f"{name}{i}")
            await asyncio.sleep(0)

    async def main() -> None:
        others = [asyncio.create_task(step(f"o{k}-", 2)) for k in range(5)]
        await asyncio.sleep(0)  # they are all under way
        await run_urgent(step("u", 3))
        await asyncio.gather(*others)

    on_worker_loop(main)
    urgent = [order.index(f"u{i}") for i in range(3)]
    assert urgent == sorted(urgent)
    assert order.index("u2") < order.index("o4-1"), order


def test_the_sockets_are_polled_between_turns_of_long_callbacks():
    """Twenty callbacks of a millisecond each are ready when the socket becomes readable: a
    plain loop would run all twenty first; this one reads the socket after a turn."""
    order: list[str] = []
    count = 20

    async def main() -> None:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        left.setblocking(False)
        got = loop.create_future()

        def readable() -> None:
            left.recv(16)
            order.append("read")
            loop.remove_reader(left)
            got.set_result(None)

        loop.add_reader(left, readable)
        for i in range(count):
            loop.call_soon(lambda i=i: (busy(TURN_SECONDS / 2), order.append(f"cb{i}")))
        right.send(b"x")
        await got
        await asyncio.sleep(0.1)
        left.close()
        right.close()

    on_worker_loop(main)
    assert len(order) == count + 1
    assert order.index("read") < count // 2, order


def test_an_urgent_task_that_never_waits_does_not_starve_the_others():
    progress: list[int] = []

    async def spin() -> None:
        end = time.perf_counter() + 20 * STARVED_SECONDS
        while True:  # never waits on anything: only gives the loop a turn
            await asyncio.sleep(0)
            if time.perf_counter() > end:
                return

    async def other() -> None:
        for i in range(100):
            progress.append(i)
            await asyncio.sleep(0)

    async def main() -> int:
        spinning = asyncio.get_running_loop().create_task(spin(), context=urgent_context())
        counting = asyncio.create_task(other())
        await spinning
        done = len(progress)
        await counting
        return done

    assert on_worker_loop(main) >= 5, "the other task went on while the urgent one spun"


def test_asyncio_works_as_usual_on_it():
    async def main() -> list[int]:
        queue: asyncio.Queue[int] = asyncio.Queue()

        async def produce() -> None:
            for i in range(50):
                await queue.put(i)
                await asyncio.sleep(0.001 if i % 10 == 0 else 0)

        async def consume() -> list[int]:
            return [await queue.get() for _ in range(50)]

        _, got = await asyncio.gather(produce(), asyncio.wait_for(consume(), 5))
        assert URGENT.get() is False
        return got

    assert run(main(), loop_factory=WorkerEventLoop) == list(range(50))


def test_the_worker_command_runs_the_worker_on_this_loop(monkeypatch):
    """`stepfleet worker` serves on a WorkerEventLoop (tests start workers on their own)."""
    from typer.testing import CliRunner

    from stepfleet.cli.main import app
    from stepfleet.workers import logs as logs_module
    from stepfleet.workers import worker as worker_module

    seen: list[type] = []

    class Recording:
        def __init__(self, _settings: object) -> None:
            self.ready = asyncio.Event()

        def stop(self) -> None:
            pass

        async def run(self) -> None:
            seen.append(type(asyncio.get_running_loop()))

    monkeypatch.setattr(worker_module, "Worker", Recording)
    # Logging would be pointed at the runner's captured stderr, closed after the command.
    monkeypatch.setattr(logs_module, "configure_logging", lambda *_: None)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(app, ["worker"])
    finally:
        signal.signal(signal.SIGTERM, previous)  # the command ignores it once stopped
    assert result.exit_code == 0, result.output
    assert seen == [WorkerEventLoop]
