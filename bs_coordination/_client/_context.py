"""``DeviceCoordinationContext``: hold a device for the body of an ``async with``."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import TYPE_CHECKING

from bs_coordination.errors import CoordinationError, LockConflictError, LockNotFoundError
from bs_coordination.models import DeviceLock, LockResponse, LockType

if TYPE_CHECKING:
    from bs_coordination._client._client import DeviceCoordinationClient
    from bs_coordination._client._lease import LeaseKeeper

log = logging.getLogger(__name__)


def describe_holder(lock: DeviceLock) -> str:
    """``'det1' is held by 'alice' (MAINTENANCE), reason: 'bake-out'``."""
    text = f"{lock.device_name!r} is held by {lock.user_id!r} ({lock.lock_type.value}"
    if lock.state.value != "active":
        text += f", {lock.state.value}"
    text += ")"
    if lock.reason:
        text += f", reason: {lock.reason!r}"
    return text


def conflict_error(device: str, response: LockResponse) -> LockConflictError:
    """The error for a refused request; its message names the holder even when the service's
    message does not (the original service answered with a bare message)."""
    message = response.message or f"Device {device!r} is not available"
    holder = response.conflicts[0] if response.conflicts else None
    if holder is not None and repr(holder.user_id) not in message:
        message = f"{message}: {describe_holder(holder)}"
    return LockConflictError(message, response.conflicts)


class DeviceCoordinationContext:
    """Lock ``device_name`` for the body of an ``async with`` block; the key is its value.

    ::

        async with DeviceCoordinationContext(client, "det1", LockType.MANUAL_OPERATOR,
                                             "alice", reason="alignment") as lock_key:
            ...  # det1 is ours here

    A refused request raises ``LockConflictError`` naming the holder (``.conflicts`` has the
    records). The lock is released when the block ends, also by an exception or a
    cancellation; the release itself is shielded from cancellation. ``keep_alive=True`` renews
    the lease in the background for bodies that may outlast ``timeout``.
    """

    def __init__(
        self,
        client: DeviceCoordinationClient,
        device_name: str,
        lock_type: LockType | str,
        user_id: str,
        timeout: float | None = 300,
        reason: str | None = None,
        plan_uid: str | None = None,
        wait: float = 0,
        *,
        keep_alive: bool = False,
    ) -> None:
        self.client = client
        self.device_name = device_name
        self.lock_type = lock_type
        self.user_id = user_id
        self.timeout = timeout
        self.reason = reason
        self.plan_uid = plan_uid
        self.wait = wait
        self.keep_alive = keep_alive
        #: The grant, once entered.
        self.response: LockResponse | None = None
        self._lock_key: str | None = None
        self._keeper: LeaseKeeper | None = None

    def __repr__(self) -> str:  # never show the key
        return (f"<DeviceCoordinationContext {self.device_name!r} "
                f"{getattr(self.lock_type, 'value', self.lock_type)} user={self.user_id!r}>")

    async def __aenter__(self) -> str:
        response = await self.client.request_lock(
            self.device_name, self.lock_type, self.user_id, timeout=self.timeout,
            reason=self.reason, plan_uid=self.plan_uid, wait=self.wait)
        if not response.success or not response.lock_key:
            raise conflict_error(self.device_name, response)
        self.response = response
        self._lock_key = response.lock_key
        if self.keep_alive and self.timeout is not None:
            self._keeper = self.client.keep_alive(response.lock_key, timeout=self.timeout)
        return response.lock_key

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        key, self._lock_key = self._lock_key, None
        if key is None:
            return
        # A task of its own, so a second cancellation cannot abandon the release half-way;
        # the client keeps it until it is done (``disconnect`` waits for it).
        release = self.client._spawn(self._release(key))
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            raise  # the release goes on in the background
        except LockNotFoundError as err:
            log.warning("releasing %r: the lock was already gone (%s)", self.device_name,
                        err.message)
        except CoordinationError as err:
            if exc is None:
                raise
            # Never hide the body's own exception behind a failed release; the lease ends it.
            log.warning("releasing %r failed (%s); the lease will end the lock",
                        self.device_name, err.message)

    async def _release(self, key: str) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await keeper.stop()
        await self.client.release_lock(self.device_name, key, self.user_id)
