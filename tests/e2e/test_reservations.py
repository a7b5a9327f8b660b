"""Queue reservations against a real RE Manager: waiting items hold ``QUEUE_QUEUED`` locks on
their devices with their item uids; a starting item's ``QUEUE_EXECUTING`` locks consume its
reservations; removed items drop theirs; operators outrank reservations."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from bluesky_queueserver_api import BPlan
from lockhttp import LockHttp

from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.reservations import QueueReservations, names_from_device_list

from .conftest import QUEUE_USER, STARTUP, QueueServer, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis]

RESERVER = "reserver"


class ReserverThread:
    """``QueueReservations`` following the queue in a thread with its own event loop."""

    def __init__(self, qs: QueueServer, url: str | None = None, **kwargs: Any) -> None:
        self.qs = qs
        self.url = url or qs.locks.url
        self.kwargs = kwargs
        self.reserver: QueueReservations | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._target, daemon=True)

    def _target(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._errors.append(exc)
            self._ready.set()

    async def _main(self) -> None:
        from bluesky_queueserver_api.zmq.aio import REManagerAPI

        manager = REManagerAPI(zmq_control_addr=self.qs.control_addr)
        try:
            async with DeviceCoordinationClient(self.url) as client:
                self.reserver = QueueReservations(manager, client, user_id=RESERVER,
                                                  interval=0.05, retry=0.1, **self.kwargs)
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                self._ready.set()
                await self.reserver.run(self._stop)
        finally:
            await manager.close()

    def start(self) -> ReserverThread:
        self._thread.start()
        assert self._ready.wait(10)
        if self._errors:
            raise self._errors[0]
        return self

    def call(self, coro: Any) -> Any:
        """Run ``coro`` on the reserver's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def synced(self, steps: int = 2) -> None:
        """Wait until ``steps`` more sync steps have completed (so the last one saw now)."""
        assert self.reserver is not None
        target = self.reserver.syncs + steps
        wait_until(lambda: self.reserver.syncs >= target or self._errors, timeout=10,
                   what=f"{steps} reservation syncs")
        if self._errors:
            raise self._errors[0]

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        assert not self._thread.is_alive()
        if self._errors:
            raise self._errors[0]


@pytest.fixture
def reserver(qs: QueueServer) -> Iterator[ReserverThread]:
    r = ReserverThread(qs).start()
    try:
        yield r
    finally:
        r.stop()


def _reserved(qs: QueueServer) -> dict[str, dict[str, Any]]:
    return {name: lk for name, lk in qs.locks.held(RESERVER).items()
            if lk["lock_type"] == "QUEUE_QUEUED"}


def _time(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _reserved_exactly(qs: QueueServer, names: set[str]) -> dict[str, dict[str, Any]] | None:
    reserved = _reserved(qs)
    return reserved if set(reserved) == names else None


def test_waiting_items_are_reserved_consumed_when_they_start_and_dropped_when_removed(
        qs: QueueServer, reserver: ReserverThread) -> None:
    api = qs.api
    first = api.item_add(BPlan("count", ["det1"], num=10, delay=0.2))["item"]["item_uid"]
    second = api.item_add(BPlan("scan", ["det2"], "motor2", -1, 1, 3))["item"]["item_uid"]
    third = api.item_add(BPlan("move_then_count", "stage.coarse.x", 0.5, ["det"])
                         )["item"]["item_uid"]

    want = {"det1": (first, "count"), "det2": (second, "scan"), "motor2": (second, "scan"),
            "stage": (third, "move_then_count"), "det": (third, "move_then_count")}
    held = wait_until(lambda: _reserved_exactly(qs, set(want)),
                      what="reservations of the three waiting items")
    for name, (uid, plan) in want.items():
        assert held[name]["plan_uid"] == uid, name
        assert plan in held[name]["reason"], held[name]["reason"]
        assert held[name]["state"] == "active"
        assert held[name]["expires_at"] is not None  # a program's lock has a lease

    # An item leaving the queue drops its reservations, the others stay.
    api.item_remove(uid=third)
    wait_until(lambda: set(_reserved(qs)) == {"det1", "det2", "motor2"},
               what="the removed item's reservations are dropped")

    since = qs.locks.last_event_id()
    api.queue_start()
    executing = wait_until(lambda: qs.locks.held(QUEUE_USER).get("det1"),
                           what="the first item takes det1")
    assert (executing["lock_type"], executing["plan_uid"]) == ("QUEUE_EXECUTING", first)
    # The first item's reservation was consumed; the second's are still there.
    events = qs.locks.events(since)
    consumed = [e for e in events if e["action"] == "consumed"]
    assert [(e["device_name"], e["lock"]["plan_uid"]) for e in consumed] == [("det1", first)]
    reserved = _reserved(qs)
    assert set(reserved) == {"det2", "motor2"}
    assert all(lk["plan_uid"] == second for lk in reserved.values())

    api.wait_for_idle(timeout=30)
    results = {h["item_uid"]: h["result"]["exit_status"] for h in qs.history()}
    assert (results[first], results[second]) == ("completed", "completed")
    wait_until(lambda: qs.locks.locks() == [], what="no lock left after both items")
    events = qs.locks.events(since)
    consumed = {(e["device_name"], e["lock"]["plan_uid"]) for e in events
                if e["action"] == "consumed"}
    assert consumed == {("det1", first), ("det2", second), ("motor2", second)}
    # Nothing was preempted or restored: reservations were taken over, not displaced.
    assert [e for e in events if e["action"] in ("preempted", "restored")] == []


def test_a_device_named_by_two_items_is_reserved_for_the_first(
        qs: QueueServer, reserver: ReserverThread) -> None:
    first = qs.api.item_add(BPlan("count", ["det1"]))["item"]["item_uid"]
    second = qs.api.item_add(BPlan("scan", ["det1"], "motor1", -1, 1, 3))["item"]["item_uid"]
    held = wait_until(lambda: _reserved_exactly(qs, {"det1", "motor1"}),
                      what="the first item's device and the second's other device are reserved")
    assert (held["det1"]["plan_uid"], held["motor1"]["plan_uid"]) == (first, second)

    # The first leaves the queue: the second gets det1 too.
    qs.api.item_remove(uid=first)
    held = wait_until(lambda: (r := _reserved(qs)).get("det1", {}).get("plan_uid") == second
                      and r, what="det1 passes to the second item")
    assert {lk["plan_uid"] for lk in held.values()} == {second}
    qs.api.item_remove(uid=second)
    wait_until(lambda: _reserved(qs) == {}, what="the reservations are dropped")


def test_an_operator_outranks_a_reservation(qs: QueueServer, reserver: ReserverThread) -> None:
    key = qs.locks.lock("det", "MANUAL_OPERATOR", "operator_olga", reason="aligning")
    uid = qs.api.item_add(BPlan("scan", ["det"], "motor", -1, 1, 3))["item"]["item_uid"]
    wait_until(lambda: "motor" in _reserved(qs), what="the free device is reserved")
    reserver.synced()
    assert set(_reserved(qs)) == {"motor"}  # det is the operator's: not reserved
    assert qs.locks.held("operator_olga")["det"]["state"] == "active"

    qs.locks.release(key)
    held = wait_until(lambda: _reserved(qs).get("det"),
                      what="det is reserved once the operator lets go")
    assert held["plan_uid"] == uid

    # An operator asking for a reserved device gets it (the reservation waits, preempted).
    key = qs.locks.lock("motor", "MANUAL_OPERATOR", "operator_olga", reason="one more look")
    assert qs.locks.held(RESERVER)["motor"]["state"] == "preempted"
    qs.locks.release(key)
    assert qs.locks.held(RESERVER)["motor"]["state"] == "active"

    qs.api.item_remove(uid=uid)
    wait_until(lambda: _reserved(qs) == {}, what="the removed item's reservations are dropped")


def test_reservations_are_renewed_while_held(qs: QueueServer) -> None:
    r = ReserverThread(qs, lease=1.0).start()
    try:
        uid = qs.api.item_add(BPlan("count", ["det1"]))["item"]["item_uid"]
        first = wait_until(lambda: _reserved(qs).get("det1"), what="det1 is reserved")
        assert first["plan_uid"] == uid
        # Outlive the lease twice over: the same reservation, its lease moved on.
        start = _time(first["expires_at"])
        later = wait_until(
            lambda: (lk := _reserved(qs).get("det1")) and _time(lk["expires_at"]) - start >= 2.0
            and lk, what="the lease is renewed past two lease lengths")
        assert later["acquired_at"] == first["acquired_at"]
        assert [e for e in qs.locks.events() if e["action"] == "expired"] == []
        assert any(e["action"] == "renewed" and e["lock"]["plan_uid"] == uid
                   for e in qs.locks.events())
        qs.api.item_remove(uid=uid)
        wait_until(lambda: _reserved(qs) == {}, what="the removed item's reservation is dropped")
    finally:
        r.stop()


def test_device_names_come_from_the_service_discovery_when_it_has_them(
        qs: QueueServer, service_factory: Any) -> None:
    svc = service_factory("memory", profile_collection=str(STARTUP.parent))
    other = LockHttp(svc.url)
    try:
        if other.http.get("/api/device-config/status").status_code == 404:
            pytest.skip("this service has no device discovery (no /api/device-config)")
        status = wait_until(lambda: (st := other.http.get("/api/device-config/status").json())
                            ["ready"] and st, timeout=60, what="the service discovers the devices")
        assert status["count"] > 0, status
        listed = other.http.get("/api/device-config/devices").json()["devices"]
        r = ReserverThread(qs, url=svc.url).start()
        try:
            assert r.reserver is not None
            known = r.call(r.reserver.known_devices())
            assert known == names_from_device_list(listed)
            assert {"stage", "stage.coarse.x", "det"} <= known
            uid = qs.api.item_add(BPlan("move_then_count", "stage.coarse.x", 1.0, ["det"])
                                  )["item"]["item_uid"]
            held = wait_until(lambda: (lk := other.held(RESERVER)) and set(lk) == {"stage", "det"}
                              and lk, what="the item's devices are reserved in that service")
            assert {lk["plan_uid"] for lk in held.values()} == {uid}
            qs.api.item_remove(uid=uid)
            wait_until(lambda: other.held(RESERVER) == {}, what="the reservations are dropped")
        finally:
            r.stop()
    finally:
        other.close()


def test_the_reserve_command_follows_the_queue(qs: QueueServer) -> None:
    """``python -m bs_coordination.reservations`` (the ``bs-coordination-reserve`` command)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bs_coordination.reservations", "--zmq-control-addr",
         qs.control_addr, "--url", qs.locks.url, "--user", RESERVER, "--interval", "0.1",
         "--log-level", "WARNING"])
    try:
        uid = qs.api.item_add(BPlan("count", ["det1", "det2"]))["item"]["item_uid"]
        held = wait_until(lambda: _reserved_exactly(qs, {"det1", "det2"}),
                          what="the command reserves the item's devices")
        assert {lk["plan_uid"] for lk in held.values()} == {uid}
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    # Stopping the command gives its reservations back.
    assert _reserved(qs) == {}
    qs.api.item_remove(uid=uid)
