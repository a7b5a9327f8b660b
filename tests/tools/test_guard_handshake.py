"""The manual-access guard in the preemption handshake: a write in progress finishes before
maintenance is answered, and later writes are refused naming the preemptor."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from ophyd.sim import SynAxis

from bs_coordination.guard import DeviceAccessRefused, ManualAccessGuard


class SlowWriteMotor(SynAxis):
    """``set()`` itself takes ``write_seconds`` (a synchronous write in progress); records
    when each write starts and ends."""

    def __init__(self, *args: Any, write_seconds: float = 0.3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_seconds = write_seconds
        self.writes: list[tuple[float, float]] = []
        self.writing = threading.Event()

    def set(self, value: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        self.writing.set()
        time.sleep(self.write_seconds)
        status = super().set(value, **kwargs)
        self.writes.append((start, time.monotonic()))
        return status


@pytest.fixture
def guard(live_service: Any) -> Any:
    g = ManualAccessGuard(live_service.url, user_id="alice", reason="alignment")
    yield g
    g.close()


def _maintenance(url: str) -> tuple[dict[str, Any], float]:
    r = httpx.post(url + "/api/lock/request", json={
        "device_name": "gmotor", "lock_type": "MAINTENANCE", "user_id": "maint_bob",
        "reason": "encoder swap"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic()


def test_a_write_in_progress_finishes_before_maintenance_is_answered(
        live_service: Any, guard: ManualAccessGuard) -> None:
    motor = SlowWriteMotor(name="gmotor")
    guard.protect(motor)
    guard.acquire(motor)  # locked (with the handshake) before the write starts
    writer = threading.Thread(target=lambda: motor.set(1.0).wait(10))
    writer.start()
    assert motor.writing.wait(5)
    answer, answered = _maintenance(live_service.url)
    writer.join(10)
    ((_, end),) = motor.writes
    assert end <= answered  # the write in progress ended before the answer
    assert answer["acknowledged"] is True
    assert answer["preempted"][0]["user_id"] == "alice"
    assert motor.position == 1.0
    # Later writes are refused at once, naming the preemptor; nothing moves.
    with pytest.raises(DeviceAccessRefused) as refused:
        motor.set(2.0)
    assert "maint_bob" in str(refused.value) and "MAINTENANCE" in str(refused.value)
    assert "encoder swap" in str(refused.value)
    with pytest.raises(DeviceAccessRefused, match="maint_bob"):
        motor.setpoint.put(3.0)
    assert len(motor.writes) == 1 and motor.position == 1.0
    # Maintenance hands it back: the guard's lock is restored and writes go through again.
    httpx.post(live_service.url + "/api/lock/release", json={"lock_key": answer["lock_key"]})
    deadline = time.monotonic() + 5
    while True:
        try:
            motor.set(4.0).wait(10)
            break
        except DeviceAccessRefused:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert motor.position == 4.0


def test_an_idle_guard_acknowledges_at_once(live_service: Any,
                                            guard: ManualAccessGuard) -> None:
    motor = SlowWriteMotor(name="gmotor", write_seconds=0.0)
    guard.protect(motor)
    motor.set(1.0).wait(10)  # takes the lock
    start = time.monotonic()
    answer, answered = _maintenance(live_service.url)
    assert answer["acknowledged"] is True
    assert answered - start < 1.0  # not the 2 s deadline
