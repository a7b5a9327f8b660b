"""``DeviceCoordinationContext`` against the real service: hold, refuse naming the holder,
release on exit, on exception and on cancellation."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from bs_coordination import (
    DeviceCoordinationClient,
    DeviceCoordinationContext,
    LockConflictError,
    LockType,
)

MANUAL = LockType.MANUAL_OPERATOR


async def test_holds_inside_and_releases_after(client: DeviceCoordinationClient) -> None:
    ctx = DeviceCoordinationContext(client, "det1", MANUAL, "alice", reason="align")
    async with ctx as lock_key:
        assert isinstance(lock_key, str) and lock_key
        status = await client.get_lock_status("det1")
        assert status.lock is not None and (status.lock.user_id, status.lock.reason) == (
            "alice", "align")
        assert ctx.response is not None and ctx.response.lock_key == lock_key
        assert lock_key not in repr(ctx)
    assert not await client.is_device_locked("det1")
    history = [(e.action.value, e.device_name) for e in (await client.get_events()).events]
    assert history == [("acquired", "det1"), ("released", "det1")]


async def test_refusal_raises_conflict_naming_the_holder(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient) -> None:
    await other.request_lock("det1", LockType.MAINTENANCE, "carol", reason="vacuum leak")
    with pytest.raises(LockConflictError) as info:
        async with DeviceCoordinationContext(client, "det1", MANUAL, "alice"):
            pytest.fail("the body must not run")  # pragma: no cover
    err = info.value
    assert "'carol'" in err.message and "MAINTENANCE" in err.message
    assert "vacuum leak" in err.message
    [holder] = err.conflicts
    assert (holder.user_id, holder.reason) == ("carol", "vacuum leak")
    assert err.holder == holder
    locks = (await client.get_all_locks()).locks
    assert [lock.user_id for lock in locks] == ["carol"]


async def test_wait_enters_when_the_holder_lets_go(client: DeviceCoordinationClient,
                                                   other: DeviceCoordinationClient) -> None:
    held = await other.request_lock("det1", MANUAL, "bob")

    async def release_soon() -> None:
        await asyncio.sleep(0.2)
        await other.release_lock("det1", held.lock_key, "bob")

    releaser = asyncio.create_task(release_soon())
    async with DeviceCoordinationContext(client, "det1", MANUAL, "alice", wait=10):
        status = await client.get_lock_status("det1")
        assert status.lock is not None and status.lock.user_id == "alice"
    await releaser
    assert not await client.is_device_locked("det1")


async def test_releases_when_the_body_raises(client: DeviceCoordinationClient) -> None:
    with pytest.raises(ValueError, match="scan failed"):
        async with DeviceCoordinationContext(client, "det1", MANUAL, "alice"):
            assert await client.is_device_locked("det1")
            raise ValueError("scan failed")
    assert not await client.is_device_locked("det1")


async def test_releases_when_the_task_is_cancelled(client: DeviceCoordinationClient) -> None:
    entered = asyncio.Event()

    async def operator() -> None:
        async with DeviceCoordinationContext(client, "det1", MANUAL, "alice"):
            entered.set()
            await asyncio.Event().wait()  # works on the device until cancelled

    task = asyncio.create_task(operator())
    await entered.wait()
    assert await client.is_device_locked("det1")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await client.is_device_locked("det1")  # released before the task ended


async def test_a_second_cancellation_cannot_stop_the_release(
        live_service: Any, proxy: Any, other: DeviceCoordinationClient, eventually: Any) -> None:
    slow = DeviceCoordinationClient(proxy.url, timeout=10)
    await slow.connect()
    entered = asyncio.Event()

    async def operator() -> None:
        async with DeviceCoordinationContext(slow, "det1", MANUAL, "alice"):
            entered.set()
            await asyncio.Event().wait()

    try:
        task = asyncio.create_task(operator())
        await entered.wait()
        proxy.delay = 0.5  # the release request will take a while to arrive
        task.cancel()
        await eventually(lambda: b"POST /api/lock/release" in proxy.sent,
                         what="the release request")
        task.cancel()  # cancelled again while the release is under way
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await slow.disconnect()  # waits for the release still under way
    assert not await other.is_device_locked("det1")


async def test_a_lock_already_gone_at_exit_is_only_logged(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bs_coordination"):
        async with DeviceCoordinationContext(client, "det1", MANUAL, "alice"):
            await other.force_release("det1", reason="admin")
    assert "already gone" in caplog.text


async def test_a_failed_release_never_hides_the_body_error(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient) -> None:
    with pytest.raises(KeyError, match="motor"):
        async with DeviceCoordinationContext(client, "det1", MANUAL, "alice"):
            await other.force_release("det1")
            raise KeyError("motor")


async def test_keep_alive_renews_a_short_lease(client: DeviceCoordinationClient,
                                               eventually: Any) -> None:
    async def renewed_three_times() -> bool:
        events = (await client.get_events()).events
        return sum(e.action.value == "renewed" for e in events) >= 3

    async with DeviceCoordinationContext(client, "det1", LockType.QUEUE_EXECUTING, "queue",
                                         timeout=1, keep_alive=True):
        # Three renewals at a third of the lease each: the body outlives its 1 s lease.
        await eventually(renewed_three_times, what="three renewals")
        assert await client.is_device_locked("det1")
    actions = [e.action.value for e in (await client.get_events()).events]
    assert actions[0] == "acquired" and actions[-1] == "released"
    assert "expired" not in actions
