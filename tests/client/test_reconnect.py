"""Automatic WebSocket reconnect: resume after the last event, refresh the cache, resync
after a service restart. The client's WebSocket goes through a real TCP proxy that the tests
cut, pause and point at another service; lock changes go straight to the service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bs_coordination import DeviceCoordinationClient, DeviceLock, LockState, LockType

MANUAL = LockType.MANUAL_OPERATOR


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, int]] = []
        self.statuses: list[list[str]] = []

    def on_update(self, device_name: str, lock: DeviceLock, action: str) -> None:
        self.events.append((action, device_name, lock.user_id, lock.token))

    async def on_status(self, locks: list[DeviceLock]) -> None:
        self.statuses.append(sorted(f"{lock.device_name}:{lock.state.value}" for lock in locks))


async def history(client: DeviceCoordinationClient) -> list[tuple[str, str, str, int]]:
    events = (await client.get_events()).events
    return [(e.action.value, e.device_name, e.lock.user_id, e.lock.token) for e in events]


async def active_locks(client: DeviceCoordinationClient) -> dict[str, DeviceLock]:
    status = await client.get_all_locks()
    return {lock.device_name: lock for lock in status.locks if lock.state is LockState.ACTIVE}


@pytest.fixture
async def watcher(live_service: Any, proxy: Any) -> AsyncIterator[DeviceCoordinationClient]:
    """A client whose WebSocket goes through ``proxy`` (HTTP goes straight to the service)."""
    c = DeviceCoordinationClient(live_service.url, ws_url=proxy.ws_url, timeout=10,
                                 reconnect_delay=0.05, max_reconnect_delay=0.2)
    await c.connect()
    try:
        yield c
    finally:
        await c.disconnect()


async def test_reconnect_resumes_without_losing_events(
        watcher: DeviceCoordinationClient, other: DeviceCoordinationClient, proxy: Any,
        eventually: Any, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    watcher.add_lock_update_callback(rec.on_update)
    watcher.add_status_callback(rec.on_status)
    await watcher.start_websocket_monitoring()
    alice = await other.request_lock("det1", MANUAL, "alice")
    await eventually(lambda: len(rec.events) == 1)

    with caplog.at_level(logging.WARNING, logger="bs_coordination"):
        proxy.pause()
        await eventually(lambda: not watcher.websocket_connected, what="the disconnect")
        # Changes while the watcher is away, including a preemption and a restore.
        bob = await other.request_lock("det1", LockType.MAINTENANCE, "bob", reason="leak")
        await other.request_lock("det2", MANUAL, "carol")
        await other.release_lock("det1", bob.lock_key, "bob")
        refused = proxy.refused
        await eventually(lambda: proxy.refused >= refused + 2, what="retries while refused")
        assert watcher.monitoring and watcher.reconnect_count == 0
        proxy.resume()
        await eventually(lambda: watcher.websocket_connected, what="the reconnect")
        expected = await history(other)
        await eventually(lambda: len(rec.events) >= len(expected), what="the missed events")
    assert rec.events == expected  # every event once, in order
    assert [e[0] for e in rec.events] == ["acquired", "preempted", "acquired", "acquired",
                                          "released", "restored"]
    assert watcher.reconnect_count >= 1
    assert "disconnected" in caplog.text
    # The cache was refreshed from the new initial status, which the status callbacks saw.
    assert watcher.get_all_cached_locks() == await active_locks(other)
    assert rec.statuses == [[], ["det1:active", "det2:active"]]
    restored = watcher.get_cached_lock_status("det1")
    assert restored is not None and restored.user_id == "alice"
    assert restored.token > alice.token  # type: ignore[operator]


async def test_cuts_during_a_stream_of_changes_lose_nothing(
        watcher: DeviceCoordinationClient, other: DeviceCoordinationClient, proxy: Any,
        eventually: Any) -> None:
    rec = Recorder()
    watcher.add_lock_update_callback(rec.on_update)
    await watcher.start_websocket_monitoring()

    async def churn() -> None:
        for i in range(40):
            granted = await other.request_lock(f"dev{i % 4}", MANUAL, "bob")
            await other.release_lock(None, granted.lock_key, "bob")

    worker = asyncio.create_task(churn())
    cuts = 0
    while not worker.done():
        await eventually(lambda: watcher.websocket_connected, what="a connection")
        await asyncio.sleep(0.02)
        proxy.cut()
        cuts += 1
    await worker
    expected = await history(other)
    assert len(expected) == 80
    await eventually(lambda: len(rec.events) >= 80, timeout=10, what="all 80 events")
    assert rec.events == expected
    assert watcher.reconnect_count >= 1 and cuts >= 1
    assert watcher.get_all_cached_locks() == {}


async def test_service_restart_without_persistence_resyncs(
        watcher: DeviceCoordinationClient, other: DeviceCoordinationClient, proxy: Any,
        service_factory: Any, eventually: Any, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    watcher.add_lock_update_callback(rec.on_update)
    watcher.add_status_callback(rec.on_status)
    await watcher.start_websocket_monitoring()
    for name in ("det1", "det2", "det3"):
        await other.request_lock(name, MANUAL, "alice")
    await eventually(lambda: len(rec.events) == 3)
    assert set(watcher.get_all_cached_locks()) == {"det1", "det2", "det3"}

    # "Restart": a fresh memory-store service takes the old one's place behind the proxy.
    fresh = service_factory("memory")
    proxy.pause()
    proxy.retarget(fresh.port)
    caplog.set_level(logging.WARNING, logger="bs_coordination")
    async with DeviceCoordinationClient(fresh.url) as direct:
        await direct.request_lock("det9", MANUAL, "dave")  # its event id 1 < the old 3
        proxy.resume()
        await eventually(lambda: watcher.get_all_cached_locks().keys() == {"det9"},
                         what="the cache of the restarted service")
        await direct.request_lock("det8", MANUAL, "dave")
        await eventually(lambda: len(rec.events) == 5, what="events of the new service")
        new_history = await history(direct)
        assert watcher.get_all_cached_locks() == await active_locks(direct)
        assert watcher.last_event_id == (await direct.get_events()).last_event_id
    # The new service's events, from its first one, each once.
    assert rec.events[3:] == new_history
    assert rec.statuses[0] == []
    assert rec.statuses[1] == ["det9:active"]  # the restarted service's first status
    assert "event log restarted" in caplog.text



@pytest.mark.redis
async def test_resume_on_another_replica_of_a_redis_store(
        redis_server: Any, service_factory: Any, make_proxy: Any, eventually: Any) -> None:
    """Two service processes on one Redis: the watcher loses replica A and resumes on B,
    from the shared event stream (Redis Stream ids), without losing or repeating an event."""
    a = service_factory(redis_server.url)
    b = service_factory(redis_server.url)
    proxy = await make_proxy(a.port)
    rec = Recorder()
    watcher = DeviceCoordinationClient(a.url, ws_url=proxy.ws_url, timeout=10,
                                       reconnect_delay=0.05, max_reconnect_delay=0.2)
    try:
        async with DeviceCoordinationClient(a.url) as via_a, \
                DeviceCoordinationClient(b.url) as via_b:
            watcher.add_lock_update_callback(rec.on_update)
            watcher.add_status_callback(rec.on_status)
            await watcher.start_websocket_monitoring()
            alice = await via_a.request_lock("det1", MANUAL, "alice")
            await eventually(lambda: len(rec.events) == 1)
            assert watcher.last_event_id is not None and "-" in watcher.last_event_id

            proxy.pause()
            proxy.retarget(b.port)
            await eventually(lambda: not watcher.websocket_connected, what="the disconnect")
            await via_b.request_lock("det1", LockType.MAINTENANCE, "bob")
            await via_a.request_lock("det2", MANUAL, "carol")
            await via_a.release_lock("det1", alice.lock_key, "alice")
            proxy.resume()
            expected = await history(via_b)
            assert len(expected) == 5
            await eventually(lambda: len(rec.events) >= 5, what="the missed events")
            assert rec.events == expected
            assert watcher.get_all_cached_locks() == await active_locks(via_b)
            assert len(rec.statuses) == 2
    finally:
        await watcher.disconnect()
