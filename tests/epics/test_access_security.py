"""The IOC enforces the lock table: a real IOC with the generated access-security file, the
bridge, the real lock service and Channel Access clients with distinct user names."""

from __future__ import annotations

import asyncio
import time

import pytest
from ca_parts import wait_until
from caproto import AlarmSeverity

from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.epics.acf import Accounts, render_acf
from bs_coordination.models import LockType

PREFIX = "TEST:COORD:"
ACCOUNTS = Accounts(queue=["queue_server"], operators=["alice"], maintenance=["bob"])
M1 = "TST:m1"

pytestmark = pytest.mark.epics


def acf() -> str:
    return render_acf({"m1": [M1], "m2": ["TST:m2"]}, PREFIX, ACCOUNTS)


def lock(url: str, device: str, lock_type: LockType, user: str) -> str:
    async def go() -> str:
        async with DeviceCoordinationClient(url) as client:
            response = await client.request_lock(device, lock_type, user, timeout=None
                                                 if not lock_type.needs_lease else 300)
            assert response.success, response.message
            assert response.lock_key is not None
            return response.lock_key
    return asyncio.run(go())


def release(url: str, device: str, key: str) -> None:
    async def go() -> None:
        async with DeviceCoordinationClient(url) as client:
            await client.release_lock(device, key)
    asyncio.run(go())


def test_queue_operator_maintenance_and_a_lost_bridge(live_service, ioc_factory, bridge_factory,
                                                      ca_users, ca):
    ioc_factory(acf(), {M1: "m1", "TST:m2": "m2"})
    bridge = bridge_factory(live_service.url, PREFIX, ["m1", "m2"])
    assert f"on port {ca.bridge} " in bridge.output()  # EPICS_CA_SERVER_PORT
    alice, queue, bob = ca_users("alice"), ca_users("queue_server"), ca_users("bob")
    # Free: operators and the queue write.
    wait_until(lambda: alice.can_write(M1), 15, "the IOC lets alice write the free m1")
    assert alice.write(M1, 1.0) == 1.0
    assert queue.write(M1, 2.0) == 2.0
    # The queue holds m1: only queue accounts (and staff) write.
    qkey = lock(live_service.url, "m1", LockType.QUEUE_EXECUTING, "queue_server")
    wait_until(lambda: not alice.can_write(M1), 2, "the IOC refuses alice once the queue holds m1")
    assert alice.write(M1, 3.0) == 2.0
    assert queue.write(M1, 4.0) == 4.0
    assert alice.read(f"{PREFIX}m1:LOCK") == 1
    assert alice.read(f"{PREFIX}m1:HOLDER") == "queue_server"
    # Maintenance preempts: the queue's writes are refused by the IOC, staff write.
    mkey = lock(live_service.url, "m1", LockType.MAINTENANCE, "bob")
    wait_until(lambda: not queue.can_write(M1), 2, "the IOC refuses the queue under MAINTENANCE")
    assert queue.write(M1, 5.0) == 4.0
    assert alice.write(M1, 6.0) == 4.0
    assert bob.write(M1, 7.0) == 7.0
    release(live_service.url, "m1", mkey)
    wait_until(lambda: queue.can_write(M1), 2, "the queue writes again once its lock is restored")
    assert queue.write(M1, 8.0) == 8.0
    release(live_service.url, "m1", qkey)
    wait_until(lambda: alice.can_write(M1), 2, "alice writes the free m1 again")
    assert alice.write(M1, 9.0) == 9.0
    # The bridge stops: everyone but staff is refused within 2 s.
    bridge.stop()
    t0 = time.monotonic()
    wait_until(lambda: not alice.can_write(M1) and not queue.can_write(M1), 2,
               "the IOC refuses operators and the queue once the bridge is gone")
    assert alice.write(M1, 10.0) == 9.0
    assert queue.write(M1, 11.0) == 9.0
    assert bob.write(M1, 12.0) == 12.0
    # The bridge is back: normal rules once the IOC reconnects.
    bridge.start()
    took = wait_until(lambda: alice.can_write(M1), 30, "alice writes again after the bridge restarted")
    print(f"IOC followed the restarted bridge after {took:.1f} s ({time.monotonic() - t0:.1f} s after it stopped)")
    assert alice.write(M1, 13.0) == 13.0


def test_service_lost_and_back(service_process, ioc_factory, bridge_factory, ca_users):
    service, url = service_process()
    ioc_factory(acf(), {M1: "m1", "TST:m2": "m2"})
    bridge_factory(url, PREFIX, ["m1", "m2"])
    alice, queue, bob = ca_users("alice"), ca_users("queue_server"), ca_users("bob")
    lock(url, "m1", LockType.MANUAL_OPERATOR, "alice")
    wait_until(lambda: alice.can_write(M1) and not queue.can_write(M1), 15,
               "alice's MANUAL_OPERATOR lock: alice writes, the queue does not")
    assert alice.write(M1, 1.0) == 1.0
    assert queue.write(M1, 2.0) == 1.0
    assert alice.read(f"{PREFIX}m1:HOLDER") == "alice"
    assert alice.severity(f"{PREFIX}m1:LOCK") == AlarmSeverity.NO_ALARM
    # The service stops: every :LOCK PV goes INVALID within 2 s, only staff write.
    service.stop()
    took = wait_until(lambda: all(alice.severity(f"{PREFIX}{d}:LOCK") == AlarmSeverity.INVALID_ALARM
                                  for d in ("m1", "m2")), 2, "the bridge's :LOCK PVs INVALID")
    print(f"the bridge's PVs were INVALID {took * 1000:.0f} ms after the service stopped")
    wait_until(lambda: not alice.can_write(M1) and not alice.can_write("TST:m2"), 2,
               "the IOC refuses alice once the bridge lost the service")
    assert alice.write(M1, 3.0) == 1.0
    assert queue.write("TST:m2", 4.0) == 0.0
    assert bob.write(M1, 5.0) == 5.0
    # The service is back (a fresh memory store: nothing is locked): the bridge follows.
    service.start()
    wait_until(lambda: alice.severity(f"{PREFIX}m1:LOCK") == AlarmSeverity.NO_ALARM, 10,
               "the bridge follows the restarted service")
    assert alice.read(f"{PREFIX}m1:LOCK") == -1
    assert alice.read(f"{PREFIX}m1:HOLDER") == ""
    wait_until(lambda: alice.can_write(M1) and queue.can_write(M1) and alice.can_write("TST:m2"),
               2, "the IOC's rules follow the bridge again")
    assert queue.write(M1, 6.0) == 6.0
    assert alice.write("TST:m2", 7.0) == 7.0
