"""ophyd-async devices under ``install(RE)``: simulated devices (``ophyd_async.sim``) and EPICS
devices connected in mock mode are locked by their root device's name, and a plan on them is
suspended by maintenance and resumed when the device is handed back."""

from __future__ import annotations

import logging
import time
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import init_devices
from ophyd_async.epics.motor import Motor
from ophyd_async.sim import PatternGenerator, SimMotor, SimPointDetector, SimStage

from .conftest import Recorder, Service, wait_until


@pytest.fixture
def sim(RE: RunEngine) -> dict[str, Any]:
    """``ophyd_async.sim`` devices, named by ``init_devices`` (on the RunEngine's loop): a
    stage whose motors move at a finite speed, and a point detector."""
    pattern = PatternGenerator()
    with init_devices():
        stage = SimStage(pattern)
        det = SimPointDetector(pattern)

    async def speed_up() -> None:  # a step takes a few tens of ms
        for axis in (stage.x, stage.y):
            await axis.velocity.set(5.0)
            await axis.acceleration_time.set(0.01)

    call_in_bluesky_event_loop(speed_up())
    return {"stage": stage, "det": det}


@pytest.fixture
def mock_motor(RE: RunEngine) -> Motor:
    """An EPICS motor connected in mock mode (no IOC), named ``m1`` by ``init_devices``."""
    with init_devices(mock=True):
        m1 = Motor("BL:M1:")
    return m1


def test_sim_devices_are_locked_by_their_root_name(RE: RunEngine, coordinate: Any,
                                                   sim: dict[str, Any], service: Service,
                                                   recorder: Recorder) -> None:
    stage, det = sim["stage"], sim["det"]
    assert stage.x.name == "stage-x"  # ophyd-async names children with "-"
    coordinate()
    seen: list[dict[str, Any]] = []
    recorder.on_event(1, lambda: seen.append(service.held()))
    RE(bp.scan([det], stage.x, 0, 0.2, 3), recorder)
    recorder.join()
    assert set(seen[0]) == {"stage", "det"}
    assert {lock["lock_type"] for lock in seen[0].values()} == {"QUEUE_EXECUTING"}
    assert len(recorder.primary) == 3
    assert call_in_bluesky_event_loop(stage.x.user_readback.get_value()) == pytest.approx(0.2)
    assert service.locks() == []


def test_mock_mode_device_is_locked_by_its_root_name(RE: RunEngine, coordinate: Any,
                                                     mock_motor: Motor, service: Service) -> None:
    coordinate()
    held: list[set[str]] = []

    def plan() -> Any:
        yield from bps.mv(mock_motor.velocity, 2.5)  # a component: the lock is the root's
        held.append(set(service.held()))
        yield from bps.mv(mock_motor, 1.5)

    RE(plan())
    assert held == [{"m1"}]
    assert call_in_bluesky_event_loop(mock_motor.velocity.get_value()) == 2.5
    assert call_in_bluesky_event_loop(mock_motor.user_readback.get_value()) == 1.5
    assert service.locks() == []


def test_mock_mode_device_taken_by_maintenance_is_refused(RE: RunEngine, coordinate: Any,
                                                          mock_motor: Motor,
                                                          service: Service) -> None:
    from bs_coordination.errors import LockConflictError

    coordinate(wait=0.2)
    service.lock("m1", "MAINTENANCE", "maint_bob", reason="motor record upgrade")
    with pytest.raises(LockConflictError, match="motor record upgrade"):
        RE(bps.mv(mock_motor, 3.0))
    assert call_in_bluesky_event_loop(mock_motor.user_setpoint.get_value()) == 0.0


def _slow_steps(pause: float) -> Any:
    def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
        yield from bps.one_nd_step(detectors, step, pos_cache)
        yield from bps.sleep(pause)

    return per_step


@pytest.mark.parametrize("kind", ["sim", "mock"])
def test_maintenance_suspends_and_resumes_a_plan_on_ophyd_async_devices(
        kind: str, RE: RunEngine, coordinate: Any, sim: dict[str, Any], mock_motor: Motor,
        service: Service, recorder: Recorder) -> None:
    handle = coordinate()
    RE.record_interruptions = True
    motor, root = (sim["stage"].x, "stage") if kind == "sim" else (mock_motor, "m1")
    position = motor.user_readback
    seen: dict[str, Any] = {}

    def maintenance() -> None:
        key = service.lock(root, "MAINTENANCE", "maint_bob", reason="realigning")
        wait_until(lambda: recorder.interruptions, timeout=5.0, what="the suspension")
        time.sleep(0.2)  # let a move already under way finish
        events, where = len(recorder.primary), call_in_bluesky_event_loop(position.get_value())
        time.sleep(0.4)  # maintenance works on the device
        seen["events_while_held"] = len(recorder.primary) - events
        seen["moved_while_held"] = call_in_bluesky_event_loop(position.get_value()) != where
        seen["plan_lock"] = service.held()[root]["state"]
        service.release(key)

    recorder.on_event(4, maintenance, background=True)
    RE(bp.scan([sim["det"]], motor, 0, 1, 15, per_step=_slow_steps(0.03)), recorder)
    recorder.join()

    assert seen == {"events_while_held": 0, "moved_while_held": False, "plan_lock": "preempted"}
    why = recorder.interruptions[0]
    assert f"'{root}'" in why and "maint_bob" in why and "realigning" in why
    assert sorted({e["seq_num"] for e in recorder.primary}) == list(range(1, 16))
    assert call_in_bluesky_event_loop(position.get_value()) == pytest.approx(1.0)
    assert not handle.suspender.tripped
    assert service.locks() == []


def test_unnamed_ophyd_async_device_runs_uncoordinated_with_one_warning(
        RE: RunEngine, coordinate: Any, service: Service,
        caplog: pytest.LogCaptureFixture) -> None:
    coordinate()
    unnamed = SimMotor()  # ophyd-async devices are named "" until named

    async def connect() -> None:
        await unnamed.connect()

    call_in_bluesky_event_loop(connect())
    held: list[dict[str, Any]] = []

    def plan() -> Any:
        yield from bps.mv(unnamed, 1.0)
        held.append(service.held())
        yield from bps.mv(unnamed, 2.0)

    with caplog.at_level(logging.WARNING, logger="bs_coordination"):
        RE(plan())
        RE(plan())
    assert held == [{}, {}]
    assert call_in_bluesky_event_loop(unnamed.user_readback.get_value()) == 2.0
    warnings = [r.getMessage() for r in caplog.records if "has no name" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "not locked" in warnings[0]
