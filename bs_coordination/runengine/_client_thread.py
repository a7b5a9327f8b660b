"""Helpers of the RunEngine plugin: the client thread, holder descriptions, the queue item."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from bs_coordination.models import LockHolder, LockState

log = logging.getLogger(__name__)

T = TypeVar("T")


def describe_lock(lock: LockHolder) -> str:
    """``'motor' is held by 'bob' (MAINTENANCE, reason: 'encoder')`` for messages."""
    text = f"{lock.device_name!r} is held by {lock.user_id!r} ({lock.lock_type.value}"
    state = getattr(lock, "state", LockState.ACTIVE)
    if state is not LockState.ACTIVE:
        text += f", {state.value}"
    if lock.reason:
        text += f", reason: {lock.reason!r}"
    return text + ")"


def queue_item_uid() -> str | None:
    """The uid of the queue item being run when this is a queue-server worker, else ``None``.

    The worker keeps it in ``_running_plan_info`` and does not put it in the RunEngine
    metadata; the worker process object *is* the worker, so this is the only in-process route.
    """
    info = getattr(multiprocessing.current_process(), "_running_plan_info", None)
    if isinstance(info, dict):
        uid = info.get("item_uid")
        if isinstance(uid, str) and uid:
            return uid
    return None


def queue_item_name() -> str | None:
    """The plan name of the queue item being run (queue-server worker), else ``None``."""
    info = getattr(multiprocessing.current_process(), "_running_plan_info", None)
    if isinstance(info, dict) and isinstance(info.get("name"), str):
        return str(info["name"])
    return None


class ClientThread:
    """An asyncio loop on a daemon thread; coroutines are submitted to it from any thread."""

    def __init__(self, name: str = "bs-coordination-client") -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()
        # Cancel what is left so that closing the loop does not warn about pending tasks.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def start(self) -> None:
        self.thread.start()
        self._started.wait()

    @property
    def on_thread(self) -> bool:
        return threading.get_ident() == self.thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the client loop and wait for its result (never on the client thread)."""
        if self.on_thread:
            coro.close()
            raise RuntimeError("ClientThread.call() from the client thread would deadlock")
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if not self.on_thread:
                self.thread.join(timeout)


__all__ = ["ClientThread", "describe_lock", "queue_item_name", "queue_item_uid"]
