"""The manual-access guard on real ``ophyd.sim`` motors against a live service."""

from __future__ import annotations

from typing import Any

import pytest
from ophyd.sim import SynAxis
from servicecall import call

from bs_coordination.guard import DeviceAccessRefused, ManualAccessGuard


def queue_lock(url: str, device: str) -> str:
    status, body = call(url, "/api/lock/request", {
        "device_name": device, "lock_type": "QUEUE_EXECUTING", "user_id": "queue_server",
        "reason": "running plan count", "plan_uid": "plan-42", "timeout": 300})
    assert status == 200, body
    return str(body["lock_key"])


def holder(url: str, device: str) -> dict[str, Any] | None:
    return call(url, f"/api/locks/device/{device}")[1]["lock"]


@pytest.fixture
def motor() -> SynAxis:
    return SynAxis(name="gmotor")


@pytest.fixture
def guard(live_service):
    g = ManualAccessGuard(live_service.url, user_id="alice", reason="alignment")
    yield g
    g.close()


def test_refuses_a_set_while_the_queue_holds_the_motor_and_allows_it_when_free(live_service, motor, guard):
    key = queue_lock(live_service.url, "gmotor")
    guard.protect(motor)
    with pytest.raises(DeviceAccessRefused) as refused:
        motor.set(1.0)
    message = str(refused.value)
    assert "queue_server" in message and "QUEUE_EXECUTING" in message and "running plan count" in message
    assert refused.value.holder is not None and refused.value.holder.user_id == "queue_server"
    with pytest.raises(DeviceAccessRefused):
        motor.setpoint.put(2.0)
    assert motor.position == 0.0  # nothing moved

    assert call(live_service.url, "/api/lock/release", {"lock_key": key})[0] == 200
    motor.set(1.0).wait(timeout=10)
    assert motor.position == 1.0
    lock = holder(live_service.url, "gmotor")
    assert lock is not None and (lock["user_id"], lock["lock_type"]) == ("alice", "MANUAL_OPERATOR")
    assert guard.held == ["gmotor"]
    motor.set(2.0).wait(timeout=10)  # our own lock: no second lock, no refusal
    assert motor.position == 2.0
    assert call(live_service.url, "/api/locks/status")[1]["total_count"] == 1


def test_preempted_by_the_queue_then_restored(live_service, motor, guard):
    guard.protect(motor)
    motor.set(1.0).wait(timeout=10)
    key = queue_lock(live_service.url, "gmotor")  # higher priority: preempts alice
    with pytest.raises(DeviceAccessRefused) as refused:
        motor.set(5.0)
    assert "your MANUAL_OPERATOR lock waits under it" in str(refused.value)
    assert motor.position == 1.0
    assert call(live_service.url, "/api/lock/release", {"lock_key": key})[0] == 200
    motor.set(5.0).wait(timeout=10)  # alice's lock is back (restored), so the move goes ahead
    assert motor.position == 5.0
    assert holder(live_service.url, "gmotor")["user_id"] == "alice"


def test_require_mode_needs_an_explicit_lock(live_service, motor):
    with ManualAccessGuard(live_service.url, user_id="bob", mode="require") as guard:
        guard.protect(motor)
        with pytest.raises(DeviceAccessRefused, match="not locked by you"):
            motor.set(3.0)
        assert holder(live_service.url, "gmotor") is None  # require mode takes nothing itself
        with guard.holding(motor):
            motor.set(3.0).wait(timeout=10)
            assert holder(live_service.url, "gmotor")["user_id"] == "bob"
        assert motor.position == 3.0
        assert holder(live_service.url, "gmotor") is None


def test_close_releases_and_unprotects(live_service, motor):
    guard = ManualAccessGuard(live_service.url, user_id="carol")
    guard.protect(motor)
    motor.set(1.0).wait(timeout=10)
    assert holder(live_service.url, "gmotor")["user_id"] == "carol"
    guard.close()
    assert holder(live_service.url, "gmotor") is None
    assert "set" not in motor.__dict__
    key = queue_lock(live_service.url, "gmotor")
    motor.set(4.0).wait(timeout=10)  # no guard any more: nothing checks
    assert motor.position == 4.0
    call(live_service.url, "/api/lock/release", {"lock_key": key})


def test_a_held_component_blocks_the_whole_device(live_service, motor, guard):
    status, body = call(live_service.url, "/api/lock/request", {
        "device_name": "gmotor.setpoint", "lock_type": "MAINTENANCE", "user_id": "tech",
        "reason": "encoder swap", "timeout": 300})
    assert status == 200, body
    guard.protect(motor)
    with pytest.raises(DeviceAccessRefused, match="tech"):
        motor.set(1.0)


def test_the_runengine_moves_a_guarded_motor_under_its_own_lock(live_service, motor, guard):
    """A guarded motor in the same session as a coordinated RunEngine: the plan's moves (from
    the RunEngine's thread, under the plugin's QUEUE_EXECUTING lock) are not refused, and a hand
    move is allowed again once the plan has released the motor."""
    from bluesky import RunEngine
    from bluesky.plan_stubs import mv

    from bs_coordination import install

    RE = RunEngine({})
    seen: list[dict[str, Any] | None] = []

    def plan():
        yield from mv(motor, 3.0)
        seen.append(holder(live_service.url, "gmotor"))  # who holds it while the plan runs

    handle = install(RE, live_service.url, "queue_server", wait=5.0, lease=30.0)
    try:
        guard.protect(motor)
        RE(plan())
    finally:
        handle.uninstall()
    assert motor.position == 3.0
    assert seen[0] is not None and (seen[0]["user_id"], seen[0]["lock_type"]) == ("queue_server", "QUEUE_EXECUTING")
    assert holder(live_service.url, "gmotor") is None  # the plan released it
    motor.set(1.0).wait(timeout=10)
    assert motor.position == 1.0
    assert holder(live_service.url, "gmotor")["user_id"] == "alice"
