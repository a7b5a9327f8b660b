"""Every HTTP method of the client against the real service."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from bs_coordination import (
    CoordinationError,
    DeviceCoordinationClient,
    InvalidRequestError,
    LockNotFoundError,
    LockNotOwnedError,
    LockResponse,
    LocksStatusResponse,
    LockState,
    LockStatus,
    LockType,
    ServiceError,
)
from bs_coordination.client import default_ws_url

MANUAL = LockType.MANUAL_OPERATOR


async def test_connect_health_and_disconnect(live_service: Any) -> None:
    client = DeviceCoordinationClient(live_service.url)
    assert client.ws_url == live_service.ws_url
    await client.connect()
    assert client.connected
    health = await client.health_check()
    assert health["ready"] is True
    assert health["status"] == "ready"
    await client.disconnect()
    assert not client.connected


async def test_async_context_manager_connects_and_disconnects(live_service: Any) -> None:
    async with DeviceCoordinationClient(live_service.url) as client:
        assert client.connected
        assert (await client.get_all_locks()).total_count == 0
    assert not client.connected


async def test_connect_to_nothing_raises_a_clear_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = DeviceCoordinationClient(url, timeout=5)
    with pytest.raises(ServiceError) as info:
        await client.connect()
    assert url in info.value.message
    assert "cannot connect" in info.value.message
    assert info.value.status_code == 0
    assert isinstance(info.value, CoordinationError)
    assert not client.connected


def test_default_ws_url() -> None:
    assert default_ws_url("http://host:60620") == "ws://host:60620/ws"
    assert default_ws_url("https://host/coord/") == "wss://host/coord/ws"
    assert DeviceCoordinationClient().ws_url == "ws://localhost:60620/ws"
    assert DeviceCoordinationClient(ws_url="ws://elsewhere/ws").ws_url == "ws://elsewhere/ws"


async def test_request_and_release(client: DeviceCoordinationClient) -> None:
    response = await client.request_lock("det1", MANUAL, "alice", timeout=60, reason="alignment",
                                         plan_uid="p-1")
    assert isinstance(response, LockResponse)
    assert response.success and response.lock_key and response.token
    assert response.expires_at is not None
    [lock] = response.locks
    assert (lock.device_name, lock.user_id, lock.reason, lock.plan_uid) == (
        "det1", "alice", "alignment", "p-1")
    assert await client.is_device_locked("det1")

    answer = await client.release_lock("det1", response.lock_key, "alice")
    assert answer["success"] is True
    assert [r["device_name"] for r in answer["released"]] == ["det1"]
    assert not await client.is_device_locked("det1")


async def test_conflict_is_a_response_with_the_holder_not_an_exception(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient) -> None:
    first = await client.request_lock("det1", LockType.MAINTENANCE, "alice", reason="bake-out")
    assert first.success
    refused = await other.request_lock("det1", MANUAL, "bob")
    assert refused.success is False
    assert refused.lock_key is None
    assert "alice" in refused.message and "bake-out" in refused.message
    [holder] = refused.conflicts
    assert (holder.user_id, holder.lock_type, holder.reason) == (
        "alice", LockType.MAINTENANCE, "bake-out")
    # Equal priority is refused too; the holder keeps the device.
    assert not (await other.request_lock("det1", LockType.MAINTENANCE, "bob")).success
    status = await client.get_lock_status("det1")
    assert status.lock is not None and status.lock.user_id == "alice"


async def test_request_locks_is_atomic(client: DeviceCoordinationClient,
                                       other: DeviceCoordinationClient) -> None:
    held = await other.request_lock("m2", MANUAL, "bob")
    refused = await client.request_locks(["m1", "m2", "m3"], MANUAL, "alice")
    assert not refused.success
    assert [c.device_name for c in refused.conflicts] == ["m2"]
    assert (await client.get_all_locks()).total_count == 1  # nothing partial

    await other.release_lock("m2", held.lock_key, "bob")
    granted = await client.request_locks(["m1", "m2", "m3"], MANUAL, "alice")
    assert granted.success
    assert sorted(lock.device_name for lock in granted.locks) == ["m1", "m2", "m3"]
    # One key for all: releasing by key without a device frees every one of them.
    answer = await client.release_lock(None, granted.lock_key, "alice")
    assert sorted(r["device_name"] for r in answer["released"]) == ["m1", "m2", "m3"]
    assert (await client.get_all_locks()).total_count == 0


async def test_wait_queues_until_the_holder_releases(client: DeviceCoordinationClient,
                                                     other: DeviceCoordinationClient) -> None:
    held = await other.request_lock("det1", MANUAL, "bob")
    waiting = asyncio.create_task(client.request_lock("det1", MANUAL, "alice", wait=10))
    while not (await client.get_all_locks()).locks:  # pragma: no cover - immediate
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await other.release_lock("det1", held.lock_key, "bob")
    granted = await waiting
    assert granted.success and granted.locks[0].user_id == "alice"


async def test_wait_runs_out_into_a_refusal(client: DeviceCoordinationClient,
                                            other: DeviceCoordinationClient) -> None:
    await other.request_lock("det1", MANUAL, "bob")
    refused = await client.request_lock("det1", MANUAL, "alice", wait=0.3)
    assert not refused.success
    assert refused.conflicts[0].user_id == "bob"


async def test_upgrade_by_presenting_the_key(client: DeviceCoordinationClient) -> None:
    queued = await client.request_lock("det1", LockType.QUEUE_QUEUED, "queue", timeout=60)
    upgraded = await client.request_lock("det1", LockType.QUEUE_EXECUTING, "queue", timeout=60,
                                         lock_key=queued.lock_key)
    assert upgraded.success and upgraded.lock_key == queued.lock_key
    status = await client.get_lock_status("det1")
    assert status.lock is not None and status.lock.lock_type is LockType.QUEUE_EXECUTING


async def test_renew_lock_extends_the_lease(client: DeviceCoordinationClient) -> None:
    granted = await client.request_lock("det1", LockType.QUEUE_EXECUTING, "queue", timeout=5)
    renewed = await client.renew_lock(granted.lock_key, timeout=600)
    assert renewed.success
    assert renewed.expires_at is not None and granted.expires_at is not None
    assert (renewed.expires_at - granted.expires_at).total_seconds() > 500
    status = await client.get_lock_status("det1")
    assert status.lock is not None and status.lock.expires_at == renewed.expires_at


async def test_renew_of_a_released_lock_is_not_found(client: DeviceCoordinationClient) -> None:
    granted = await client.request_lock("det1", MANUAL, "alice")
    await client.release_lock("det1", granted.lock_key, "alice")
    with pytest.raises(LockNotFoundError):
        await client.renew_lock(granted.lock_key)


async def test_release_errors_carry_the_service_message(client: DeviceCoordinationClient,
                                                        other: DeviceCoordinationClient) -> None:
    mine = await client.request_lock("det1", MANUAL, "alice")
    theirs = await other.request_lock("det2", MANUAL, "bob")
    with pytest.raises(LockNotOwnedError) as info:
        await client.release_lock("det2", mine.lock_key, "alice")
    assert "det2" in info.value.message and info.value.status_code == 403
    with pytest.raises(LockNotFoundError) as info2:
        await client.release_lock("det3", mine.lock_key, "alice")
    assert "det3" in info2.value.message
    # Nothing changed by the refused releases.
    locks = {lock.device_name: lock.user_id for lock in (await client.get_all_locks()).locks}
    assert locks == {"det1": "alice", "det2": "bob"}
    assert theirs.success


async def test_invalid_requests_raise_invalid_request_error(
        client: DeviceCoordinationClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await client.request_lock("det1", "NOT_A_TYPE", "alice")
    assert "lock_type" in info.value.message and info.value.field == "lock_type"
    assert info.value.status_code == 422
    with pytest.raises(InvalidRequestError) as info:
        await client.request_lock("det1", LockType.QUEUE_EXECUTING, "queue", timeout=None)
    assert "timeout" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        await client.request_lock("det1", MANUAL, "alice", timeout=-1)
    assert "timeout" in info.value.message
    with pytest.raises(InvalidRequestError):
        await client.request_lock("", MANUAL, "alice")
    assert (await client.get_all_locks()).total_count == 0


async def test_status_of_devices_and_hierarchy(client: DeviceCoordinationClient) -> None:
    granted = await client.request_lock("det1", MANUAL, "alice")
    status = await client.get_lock_status("det1.cam")
    assert isinstance(status, LockStatus)
    assert status.locked and status.lock is not None and status.lock.device_name == "det1"
    await client.release_lock("det1", granted.lock_key)

    await client.request_lock("det2.cam", MANUAL, "alice")
    parent = await client.get_lock_status("det2")
    assert not parent.locked
    assert [lock.device_name for lock in parent.component_locks] == ["det2.cam"]
    assert not await client.is_device_locked("det2")

    everything = await client.get_all_locks()
    assert isinstance(everything, LocksStatusResponse)
    assert [lock.device_name for lock in everything.locks] == ["det2.cam"]
    assert everything.last_event_id is not None


async def test_can_access_device_follows_priorities(client: DeviceCoordinationClient) -> None:
    assert await client.can_access_device("det1", MANUAL)
    await client.request_lock("det1", MANUAL, "alice")
    assert not await client.can_access_device("det1", MANUAL)  # equal priority
    assert not await client.can_access_device("det1", LockType.QUEUE_QUEUED)
    assert await client.can_access_device("det1", LockType.QUEUE_EXECUTING)
    assert await client.can_access_device("det1", "MAINTENANCE")
    # A lock on a component is in the way of its parent; a preempted lock still refuses.
    await client.request_lock("det2.cam", MANUAL, "alice")
    assert not await client.can_access_device("det2", MANUAL)
    await client.request_lock("det1", LockType.QUEUE_EXECUTING, "queue")
    status = await client.get_lock_status("det1")
    assert [p.state for p in status.preempted] == [LockState.PREEMPTED]
    assert not await client.can_access_device("det1", MANUAL)
    assert await client.can_access_device("det1", LockType.MAINTENANCE)
    # What it predicts is what the service does.
    assert not (await client.request_lock("det1", MANUAL, "bob")).success
    assert (await client.request_lock("det1", LockType.MAINTENANCE, "bob")).success


async def test_force_release_and_event_history(client: DeviceCoordinationClient) -> None:
    await client.request_lock("det1", MANUAL, "alice")
    answer = await client.force_release("det1", reason="operator left")
    assert answer.success and [lock.user_id for lock in answer.released] == ["alice"]
    history = await client.get_events()
    assert [(e.action.value, e.device_name) for e in history.events] == [
        ("acquired", "det1"), ("force_released", "det1")]
    later = await client.get_events(since=history.events[0].event_id)
    assert [e.action.value for e in later.events] == ["force_released"]
    with pytest.raises(LockNotFoundError):
        await client.force_release("det1")


async def test_methods_work_without_an_explicit_connect(live_service: Any) -> None:
    client = DeviceCoordinationClient(live_service.url)
    try:
        assert (await client.request_lock("det1", MANUAL, "alice")).success
    finally:
        await client.disconnect()


async def test_api_key_is_sent_on_http_and_websocket(proxy: Any) -> None:
    async with DeviceCoordinationClient(proxy.url, api_key="s3cret-key") as client:
        await client.get_all_locks()
        await client.start_websocket_monitoring()
        assert "s3cret-key" not in repr(client)
    sent = bytes(proxy.sent).decode("latin-1")
    assert sent.count("Authorization: ApiKey s3cret-key\r\n") >= 3  # ready, status, ws
    assert "GET /ws HTTP/1.1" in sent

