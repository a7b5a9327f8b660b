"""WebSocket monitoring through the real service: initial status, callbacks, the cache."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from bs_coordination import DeviceCoordinationClient, DeviceLock, LockState, LockType

MANUAL = LockType.MANUAL_OPERATOR


class Recorder:
    """Callbacks that record ``(action, device_name, user_id, token)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, int]] = []
        self.statuses: list[list[DeviceLock]] = []

    def sync(self, device_name: str, lock: DeviceLock, action: str) -> None:
        assert isinstance(lock, DeviceLock) and isinstance(action, str)
        self.events.append((action, device_name, lock.user_id, lock.token))

    def status(self, locks: list[DeviceLock]) -> None:
        self.statuses.append(locks)


async def active_locks(client: DeviceCoordinationClient) -> dict[str, DeviceLock]:
    """The service's own answer, in the cache's shape."""
    status = await client.get_all_locks()
    return {lock.device_name: lock for lock in status.locks if lock.state is LockState.ACTIVE}


async def history(client: DeviceCoordinationClient) -> list[tuple[str, str, str, int]]:
    events = (await client.get_events()).events
    return [(e.action.value, e.device_name, e.lock.user_id, e.lock.token) for e in events]


async def test_start_returns_with_the_initial_status_in_the_cache(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient) -> None:
    granted = await other.request_lock("det1", MANUAL, "bob", reason="align")
    rec = Recorder()
    client.add_status_callback(rec.status)
    await client.start_websocket_monitoring()
    assert client.monitoring and client.websocket_connected
    # No waiting: the initial status is there when start returns.
    cached = client.get_cached_lock_status("det1")
    assert cached is not None and (cached.user_id, cached.reason) == ("bob", "align")
    assert cached.token == granted.token
    assert client.get_all_cached_locks() == await active_locks(client)
    assert [[lock.device_name for lock in locks] for locks in rec.statuses] == [["det1"]]
    assert client.last_event_id == (await client.get_all_locks()).last_event_id
    await client.start_websocket_monitoring()  # a second start is a no-op
    assert len(rec.statuses) == 1
    client.remove_status_callback(rec.status)
    await client.stop_websocket_monitoring()
    await client.start_websocket_monitoring()
    assert len(rec.statuses) == 1


async def test_sync_and_async_callbacks_see_every_change(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient,
        eventually: Any) -> None:
    rec = Recorder()
    seen_async: list[tuple[str, str]] = []

    async def on_update(device_name: str, lock: DeviceLock, action: str) -> None:
        await asyncio.sleep(0)  # really asynchronous
        seen_async.append((action, device_name))

    client.add_lock_update_callback(rec.sync)
    client.add_lock_update_callback(on_update)
    client.add_lock_update_callback(on_update)  # added once only
    await client.start_websocket_monitoring()
    granted = await other.request_lock("det1", MANUAL, "bob")
    await other.release_lock("det1", granted.lock_key, "bob")
    await eventually(lambda: len(seen_async) >= 2, what="two async callbacks")
    assert seen_async == [("acquired", "det1"), ("released", "det1")]
    assert rec.events == [("acquired", "det1", "bob", granted.token),
                          ("released", "det1", "bob", granted.token)]


async def test_a_failing_callback_is_logged_and_monitoring_goes_on(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient,
        eventually: Any, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()

    def broken(device_name: str, lock: DeviceLock, action: str) -> None:
        raise RuntimeError("callback bug")

    async def broken_async(device_name: str, lock: DeviceLock, action: str) -> None:
        raise ValueError("async callback bug")

    client.add_lock_update_callback(broken)
    client.add_lock_update_callback(broken_async)
    client.add_lock_update_callback(rec.sync)
    await client.start_websocket_monitoring()
    with caplog.at_level(logging.ERROR, logger="bs_coordination"):
        await other.request_lock("det1", MANUAL, "bob")
        await other.request_lock("det2", MANUAL, "bob")
        await eventually(lambda: len(rec.events) == 2, what="both events")
    assert "callback bug" in caplog.text and "async callback bug" in caplog.text
    assert client.monitoring and client.websocket_connected
    assert set(client.get_all_cached_locks()) == {"det1", "det2"}


async def test_removed_callback_is_not_called(client: DeviceCoordinationClient,
                                              other: DeviceCoordinationClient,
                                              eventually: Any) -> None:
    removed, kept = Recorder(), Recorder()
    client.add_lock_update_callback(removed.sync)
    client.add_lock_update_callback(kept.sync)
    await client.start_websocket_monitoring()
    await other.request_lock("det1", MANUAL, "bob")
    await eventually(lambda: len(kept.events) == 1)
    client.remove_lock_update_callback(removed.sync)
    client.remove_lock_update_callback(removed.sync)  # removing twice is harmless
    await other.request_lock("det2", MANUAL, "bob")
    await eventually(lambda: len(kept.events) == 2)
    assert [e[1] for e in removed.events] == ["det1"]


async def test_cache_follows_acquired_preempted_released_restored_expired(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient,
        eventually: Any) -> None:
    rec = Recorder()
    client.add_lock_update_callback(rec.sync)
    await client.start_websocket_monitoring()

    async def settled(n_events: int) -> None:
        await eventually(lambda: len(rec.events) >= n_events, what=f"{n_events} events")
        assert client.get_all_cached_locks() == await active_locks(client)

    alice = await other.request_lock("det1", MANUAL, "alice", reason="manual scan")
    await settled(1)
    assert client.get_cached_lock_status("det1").user_id == "alice"  # type: ignore[union-attr]

    bob = await other.request_lock("det1", LockType.MAINTENANCE, "bob", reason="vacuum")
    await settled(3)
    cached = client.get_cached_lock_status("det1")
    assert cached is not None and (cached.user_id, cached.lock_type) == ("bob",
                                                                         LockType.MAINTENANCE)
    # The component follows its parent's lock, as the device status does.
    assert client.get_cached_lock_status("det1.cam") == cached

    await other.release_lock("det1", bob.lock_key, "bob")
    await settled(5)
    restored = client.get_cached_lock_status("det1")
    assert restored is not None and restored.user_id == "alice"
    assert restored.token > alice.token  # a restore is a grant with a fresh token

    await other.release_lock("det1", alice.lock_key, "alice")
    await settled(6)
    assert client.get_cached_lock_status("det1") is None

    short = await other.request_lock("det2", LockType.QUEUE_EXECUTING, "queue", timeout=0.3)
    await settled(7)
    assert client.get_cached_lock_status("det2") is not None
    await eventually(lambda: client.get_cached_lock_status("det2") is None, what="expiry")
    await settled(8)

    assert [e[:3] for e in rec.events] == [
        ("acquired", "det1", "alice"),
        ("preempted", "det1", "alice"),
        ("acquired", "det1", "bob"),
        ("released", "det1", "bob"),
        ("restored", "det1", "alice"),
        ("released", "det1", "alice"),
        ("acquired", "det2", "queue"),
        ("expired", "det2", "queue"),
    ]
    assert rec.events == await history(client)
    assert short.success


async def test_cache_follows_renewed_upgraded_force_released_and_consumed(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient,
        eventually: Any) -> None:
    rec = Recorder()
    client.add_lock_update_callback(rec.sync)
    await client.start_websocket_monitoring()
    queued = await other.request_lock("det1", LockType.QUEUE_QUEUED, "queue", timeout=30)
    renewed = await other.renew_lock(queued.lock_key, timeout=600)
    await eventually(lambda: len(rec.events) == 2)
    cached = client.get_cached_lock_status("det1")
    assert cached is not None and cached.expires_at == renewed.expires_at

    await other.request_lock("det1", LockType.QUEUE_EXECUTING, "queue", timeout=30,
                             lock_key=queued.lock_key)
    await eventually(lambda: len(rec.events) == 3)
    cached = client.get_cached_lock_status("det1")
    assert cached is not None and cached.lock_type is LockType.QUEUE_EXECUTING

    await other.force_release("det1", reason="stuck")
    await eventually(lambda: len(rec.events) == 4)
    assert client.get_all_cached_locks() == {}

    # A plan's QUEUE_EXECUTING lock consumes its own reservation (rule 7).
    await other.request_lock("det3", LockType.QUEUE_QUEUED, "queue", timeout=30, plan_uid="p1")
    await other.request_lock("det3", LockType.QUEUE_EXECUTING, "queue", timeout=30,
                             plan_uid="p1")
    await eventually(lambda: len(rec.events) == 7)
    cached = client.get_cached_lock_status("det3")
    assert cached is not None and cached.lock_type is LockType.QUEUE_EXECUTING
    assert client.get_all_cached_locks() == await active_locks(client)
    assert [e[0] for e in rec.events] == ["acquired", "renewed", "upgraded", "force_released",
                                          "acquired", "consumed", "acquired"]


async def test_expiry_of_a_preempted_lock_leaves_the_holder_in_the_cache(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient,
        eventually: Any) -> None:
    rec = Recorder()
    client.add_lock_update_callback(rec.sync)
    await client.start_websocket_monitoring()
    await other.request_lock("det1", LockType.QUEUE_EXECUTING, "queue", timeout=0.3)
    await other.request_lock("det1", LockType.MAINTENANCE, "bob")
    await eventually(lambda: ("expired", "det1", "queue") in [e[:3] for e in rec.events],
                     what="the preempted lock's expiry")
    cached = client.get_cached_lock_status("det1")
    assert cached is not None and cached.user_id == "bob"
    assert client.get_all_cached_locks() == await active_locks(client)


async def test_stop_ends_monitoring_and_it_can_start_again(
        client: DeviceCoordinationClient, other: DeviceCoordinationClient,
        eventually: Any) -> None:
    rec = Recorder()
    client.add_lock_update_callback(rec.sync)
    await client.start_websocket_monitoring()
    await other.request_lock("det1", MANUAL, "bob")
    await eventually(lambda: len(rec.events) == 1)
    await client.stop_websocket_monitoring()
    assert not client.monitoring and not client.websocket_connected
    await other.request_lock("det2", MANUAL, "bob")
    await client.start_websocket_monitoring()
    assert set(client.get_all_cached_locks()) == {"det1", "det2"}
    await other.request_lock("det3", MANUAL, "bob")
    # A restart resumes after the last event it delivered: nothing missed, nothing twice.
    await eventually(lambda: len(rec.events) >= 3)
    assert [e[1] for e in rec.events] == ["det1", "det2", "det3"]
    assert rec.events == await history(client)


async def test_monitoring_outlives_the_http_timeout(live_service: Any,
                                                    eventually: Any) -> None:
    rec = Recorder()
    async with DeviceCoordinationClient(live_service.url, timeout=0.5) as short:
        short.add_lock_update_callback(rec.sync)
        await short.start_websocket_monitoring()
        await asyncio.sleep(1.5)  # three HTTP timeouts with no traffic on the socket
        assert short.websocket_connected and short.reconnect_count == 0
        await short.request_lock("det1", MANUAL, "alice")
        await eventually(lambda: len(rec.events) == 1)
        assert rec.events[0][:3] == ("acquired", "det1", "alice")


async def test_a_callback_may_stop_monitoring(client: DeviceCoordinationClient,
                                              other: DeviceCoordinationClient,
                                              eventually: Any) -> None:
    seen: list[str] = []

    async def stop_after_first(device_name: str, lock: DeviceLock, action: str) -> None:
        seen.append(device_name)
        await client.stop_websocket_monitoring()

    client.add_lock_update_callback(stop_after_first)
    await client.start_websocket_monitoring()
    await other.request_lock("det1", MANUAL, "bob")
    await eventually(lambda: not client.monitoring, what="monitoring to stop")
    await other.request_lock("det2", MANUAL, "bob")
    assert seen == ["det1"]
    assert not client.websocket_connected
