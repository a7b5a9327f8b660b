"""``service.tasks.stop``: a background task that swallows a cancellation still stops."""

from __future__ import annotations

import asyncio

from bs_coordination.service.tasks import stop


async def test_stop_asks_again_until_a_task_that_swallowed_a_cancel_ends() -> None:
    swallowed = 0

    async def stubborn() -> None:  # as a loop around a redis-py call that lost a cancellation
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(stop(task, every=0.05), 5)
    assert task.cancelled() and swallowed == 1


async def test_stop_of_a_finished_task_returns_at_once() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await asyncio.wait_for(stop(task), 1)
    assert task.done() and not task.cancelled()
