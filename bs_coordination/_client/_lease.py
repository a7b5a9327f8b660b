"""The lease heartbeat: renew a lock key's lease until told to stop.

Like etcd's session keep-alive it renews every third of the lease, so two renewals may fail
(service restarting, network blip) before the lease runs out. A failure is logged and retried
sooner; the heartbeat stops by itself when the service says the key holds nothing any more
(released, expired or force-released), since renewing cannot bring a lock back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from bs_coordination.errors import (
    CoordinationError,
    InvalidRequestError,
    LockNotFoundError,
)
from bs_coordination.models import RenewResponse

log = logging.getLogger(__name__)

#: Longest pause before retrying a failed renewal.
MAX_RETRY_SECONDS = 5.0

Renew = Callable[[str, float | None], Awaitable[RenewResponse]]


class LeaseKeeper:
    """Renews ``lock_key`` every ``interval`` seconds (default ``timeout / 3``) until stopped.

    Use as ``async with client.keep_alive(key, timeout=60):`` or keep the object and
    ``await keeper.stop()``. ``lost`` is set when the lock is gone; ``expires_at`` is the lease
    end the service last confirmed.
    """

    def __init__(self, renew: Renew, lock_key: str, timeout: float, interval: float | None = None,
                 ) -> None:
        if timeout is None or timeout <= 0:
            raise ValueError("timeout: a lease heartbeat needs a lease > 0 seconds")
        if interval is not None and interval <= 0:
            raise ValueError("interval: must be > 0 seconds")
        self._renew = renew
        self._lock_key = lock_key
        self.timeout = float(timeout)
        self.interval = float(interval) if interval is not None else self.timeout / 3
        self.renewals = 0
        self.failures = 0
        self.expires_at: datetime | None = None
        self.last_error: BaseException | None = None
        #: Set when the service reports the key holds no lock any more.
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._run(), name="bs-coordination-lease")

    def __repr__(self) -> str:  # never show the key
        return (f"<LeaseKeeper timeout={self.timeout:g}s interval={self.interval:g}s "
                f"renewals={self.renewals} running={self.running}>")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop renewing (the lock itself is left as it is)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # ``wait`` (not ``await task``) so a cancellation of the caller is not swallowed.
            await asyncio.wait({task})

    async def __aenter__(self) -> LeaseKeeper:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _run(self) -> None:
        delay = self.interval
        while True:
            await asyncio.sleep(delay)
            try:
                answer = await self._renew(self._lock_key, self.timeout)
            except LockNotFoundError as exc:
                self.last_error = exc
                log.warning("lease heartbeat stops: the lock is gone (%s)", exc.message)
                self.lost.set()
                return
            except InvalidRequestError as exc:
                self.last_error = exc
                log.error("lease heartbeat stops: the service refuses the renewal (%s)",
                          exc.message)
                return
            except CoordinationError as exc:
                self.failures += 1
                self.last_error = exc
                delay = min(self.interval, MAX_RETRY_SECONDS)
                log.warning("lease renewal failed (%s); retrying in %.1f s", exc.message, delay)
                continue
            except Exception as exc:  # a bug or an odd answer must not end the heartbeat
                self.failures += 1
                self.last_error = exc
                delay = min(self.interval, MAX_RETRY_SECONDS)
                log.exception("lease renewal failed unexpectedly; retrying in %.1f s", delay)
                continue
            self.renewals += 1
            self.expires_at = answer.expires_at
            delay = self.interval
