"""100,000 locks held by others: a WebSocket client still gets the whole table (in pages, no
message grows with it), and a coordinated plan runs, is suspended by maintenance and resumes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from websockets.sync.client import connect

from bs_coordination.models import MAX_DEVICES_PER_REQUEST, LockRequest, LockType
from bs_coordination.stores import MemoryStore

from .conftest import Devices, Recorder, Service, wait_until

pytestmark = [pytest.mark.slow]

HELD = 100_000


def filled_store() -> MemoryStore:
    """A memory store holding ``HELD`` operators' locks (one device each)."""
    store = MemoryStore()

    async def fill() -> None:
        for start in range(0, HELD, MAX_DEVICES_PER_REQUEST):
            names = [f"bulk{i}" for i in range(start, min(start + MAX_DEVICES_PER_REQUEST, HELD))]
            await store.request(LockRequest(
                device_names=names, lock_type=LockType.MANUAL_OPERATOR,
                user_id=f"operator{start}", timeout=None, reason="a long reason " * 20))

    asyncio.run(fill())
    return store


@pytest.fixture
def live_service(service_factory: Any) -> Any:
    return service_factory("memory", store=filled_store())


def check_the_whole_table_comes_in_pages(live_service: Any) -> None:
    with connect(live_service.ws_url, max_size=1 << 20) as ws:  # websockets' default limit
        first = json.loads(ws.recv(timeout=60))
        assert first["type"] == "initial_status"
        data = first["data"]
        assert data["total_count"] == HELD and data["page"] == 1
        locks = list(data["locks"])
        for page in range(2, data["pages"] + 1):
            msg = json.loads(ws.recv(timeout=60))
            assert msg["type"] == "status_page" and msg["of"] == "initial_status"
            assert msg["data"]["page"] == page
            locks += msg["data"]["locks"]
    assert len(locks) == HELD
    assert len({lk["device_name"] for lk in locks}) == HELD


def test_100000_held_locks_a_client_connects_and_a_plan_is_suspended_and_resumed(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        recorder: Recorder, live_service: Any) -> None:
    check_the_whole_table_comes_in_pages(live_service)
    handle = coordinate(wait=30.0)
    RE.record_interruptions = True
    motor = devices.slow_motor
    seen: dict[str, Any] = {}

    def maintenance() -> None:
        key = service.lock("slow_motor", "MAINTENANCE", "maint_bob", reason="encoder swap")
        wait_until(lambda: recorder.interruptions, timeout=30.0, what="the suspension")
        seen["tripped"] = handle.suspender.tripped
        time.sleep(0.2)
        service.release(key)

    recorder.on_event(3, maintenance, background=True)
    RE(bp.scan([devices.det], motor, 0, 5, 10), recorder)
    recorder.join()

    assert seen["tripped"] is True
    assert "encoder swap" in recorder.interruptions[0]
    assert sorted({e["seq_num"] for e in recorder.primary}) == list(range(1, 11))
    assert motor.position == pytest.approx(5)
    assert not handle.suspender.tripped
