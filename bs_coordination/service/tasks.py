"""Stopping a background task for sure (the sweeper, the event hub).

``task.cancel()`` asks once. Code that swallows the ``CancelledError`` lets the task go on,
and awaiting it then hangs the service's shutdown. redis-py 8's asyncio client is such code:
a cancellation landing at some points of a command (seen on ``TIME`` and ``ZRANGEBYSCORE``)
is lost and the command completes, so a sweeper or a tail cancelled there keeps running.
``stop(task)`` asks again until the task is done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def stop(task: asyncio.Task[Any], *, every: float = 0.5) -> None:
    """Cancel ``task`` (again every ``every`` seconds while it runs on) and wait for its end."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s ended with an error", task.get_name(), exc_info=task.exception())
