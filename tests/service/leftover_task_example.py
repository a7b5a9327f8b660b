"""Run only by ``test_conftest_guard.py`` (not collected by default): a test that leaks a task."""

import asyncio


async def test_leaves_a_task_running() -> None:
    asyncio.create_task(asyncio.sleep(3600), name="forgotten-sleeper")  # noqa: RUF006 (the leak)
