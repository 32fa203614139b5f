"""Light batches go first: heavy batches step aside at their checkpoints, within a share."""

from __future__ import annotations

import asyncio

from stepfleet.cycle import priority
from stepfleet.cycle.priority import LightFirst


async def test_a_heavy_batch_waits_at_its_checkpoint_until_the_light_batch_is_done():
    gate = LightFirst()
    order: list[str] = []
    light_may_finish = asyncio.Event()

    async def light() -> None:
        with gate.light():
            assert not gate.pressing()  # a light batch never waits for itself
            await light_may_finish.wait()
            order.append("light done")

    async def heavy() -> None:
        await gate.step_aside()
        order.append("heavy went on")

    light_task = asyncio.create_task(light())
    await asyncio.sleep(0)
    heavy_task = asyncio.create_task(heavy())
    await asyncio.sleep(0.01)
    assert gate.pressing()
    assert order == []
    light_may_finish.set()
    await asyncio.gather(light_task, heavy_task)
    assert order == ["light done", "heavy went on"]
    assert not gate.pressing()


async def test_a_heavy_batch_waits_a_bounded_time_for_a_light_batch_that_does_not_end():
    gate = LightFirst()
    never = asyncio.Event()

    async def light() -> None:
        with gate.light():
            await never.wait()

    task = asyncio.create_task(light())
    await asyncio.sleep(0)
    await gate.step_aside()  # returns: the light batch may wait on this one's row lock
    task.cancel()


async def test_light_batches_past_their_share_no_longer_hold_heavy_ones(monkeypatch):
    monkeypatch.setattr(priority, "SHARE", 0.01)  # 10 ms of every second
    gate = LightFirst()
    in_flight = asyncio.Event()
    done = asyncio.Event()

    async def light() -> None:
        with gate.light():
            in_flight.set()
            await done.wait()

    task = asyncio.create_task(light())
    await in_flight.wait()
    assert gate.pressing()  # from this (heavy) task
    await asyncio.sleep(0.03)  # the light batch has now taken more than its share
    assert not gate.pressing()
    done.set()
    await task
