"""The lease heartbeat (``client.keep_alive``) against the real service."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from bs_coordination import DeviceCoordinationClient, LockNotFoundError, LockType

QUEUE = LockType.QUEUE_EXECUTING


async def actions(client: DeviceCoordinationClient) -> list[str]:
    return [e.action.value for e in (await client.get_events()).events]


async def test_heartbeat_keeps_a_one_second_lease_alive_for_three_seconds(
        client: DeviceCoordinationClient, eventually: Any) -> None:
    granted = await client.request_lock("det1", QUEUE, "queue", timeout=1)
    keeper = client.keep_alive(granted.lock_key, timeout=1)
    assert keeper.interval == pytest.approx(1 / 3)
    assert granted.lock_key not in repr(keeper)
    try:
        await asyncio.sleep(3)  # three lease lengths
        assert await client.is_device_locked("det1")
        assert keeper.running and keeper.renewals >= 3 and keeper.failures == 0
        assert keeper.expires_at is not None and granted.expires_at is not None
        assert keeper.expires_at > granted.expires_at
        assert "expired" not in await actions(client)
    finally:
        await keeper.stop()
    assert not keeper.running
    # Without the heartbeat the lease runs out.
    await eventually(lambda: expired(client), timeout=5, what="the lease to run out")


async def expired(client: DeviceCoordinationClient) -> bool:
    return "expired" in await actions(client) and not await client.is_device_locked("det1")


async def test_heartbeat_stops_when_the_lock_is_gone(client: DeviceCoordinationClient,
                                                     eventually: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    granted = await client.request_lock("det1", QUEUE, "queue", timeout=0.6)
    with caplog.at_level(logging.WARNING, logger="bs_coordination"):
        keeper = client.keep_alive(granted.lock_key, timeout=0.6)
        await client.release_lock("det1", granted.lock_key, "queue")
        await asyncio.wait_for(keeper.lost.wait(), 5)
    assert not keeper.running
    assert isinstance(keeper.last_error, LockNotFoundError)
    assert "lock is gone" in caplog.text
    assert granted.lock_key not in caplog.text  # never log a key
    await keeper.stop()  # stopping a stopped heartbeat is harmless


async def test_heartbeat_rides_out_a_network_outage(live_service: Any, proxy: Any,
                                                    other: DeviceCoordinationClient,
                                                    eventually: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with DeviceCoordinationClient(proxy.url, timeout=2) as client:
        granted = await client.request_lock("det1", QUEUE, "queue", timeout=3)
        with caplog.at_level(logging.WARNING, logger="bs_coordination"):
            async with client.keep_alive(granted.lock_key, timeout=3, interval=0.2) as keeper:
                await eventually(lambda: keeper.renewals >= 1, what="a first renewal")
                proxy.pause()
                await eventually(lambda: keeper.failures >= 2, what="failed renewals")
                assert keeper.running  # a failure is logged, not fatal
                proxy.resume()
                before = keeper.renewals
                await eventually(lambda: keeper.renewals > before, what="renewals again")
                assert await other.is_device_locked("det1")
            assert not keeper.running
        assert "lease renewal failed" in caplog.text
        assert granted.lock_key not in caplog.text


async def test_heartbeat_checks_its_arguments(client: DeviceCoordinationClient) -> None:
    with pytest.raises(ValueError, match="timeout"):
        client.keep_alive("k", timeout=0)
    with pytest.raises(ValueError, match="interval"):
        client.keep_alive("k", timeout=10, interval=-1)


async def test_disconnect_stops_the_heartbeat(live_service: Any,
                                              other: DeviceCoordinationClient) -> None:
    client = DeviceCoordinationClient(live_service.url)
    granted = await client.request_lock("det1", QUEUE, "queue", timeout=60)
    keeper = client.keep_alive(granted.lock_key, timeout=60, interval=0.05)
    await client.disconnect()
    assert not keeper.running and not client.connected
    assert await other.is_device_locked("det1")  # the lock itself stays until its lease ends
