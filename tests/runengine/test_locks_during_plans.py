"""Which locks a plan holds, and that it gives them back however it ends."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.preprocessors import SupplementalData
from bluesky.utils import Msg, RunEngineInterrupted

from bs_coordination.errors import LockConflictError
from bs_coordination.runengine.plans import CoordinatedPreprocessor, coordinated_decorator
from bs_coordination.runengine.suspender import LockPreemptedSuspender

from .conftest import USER, Devices, Recorder, Service, wait_until


def test_plan_holds_exactly_the_devices_it_touches(RE: RunEngine, coordinate: Any,
                                                   devices: Devices, service: Service,
                                                   recorder: Recorder) -> None:
    sd = SupplementalData(baseline=[devices.det2])
    RE.preprocessors.append(sd)
    coordinate(plan_uid=lambda: "queue-item-42")
    seen: list[dict[str, dict[str, Any]]] = []
    recorder.on_event(2, lambda: seen.append(service.held()))

    RE(bp.scan([devices.det], devices.motor, -1, 1, 5), recorder)
    recorder.join()

    held = seen[0]
    assert set(held) == {"det", "motor", "det2"}  # det2: the baseline reading
    assert all(lk["lock_type"] == "QUEUE_EXECUTING" and lk["state"] == "active"
               for lk in held.values())
    assert all(lk["plan_uid"] == "queue-item-42" for lk in held.values())
    assert service.locks() == []


def test_devices_touched_later_and_components_lock_their_root(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service) -> None:
    coordinate()
    snapshots: list[set[str]] = []

    def plan() -> Any:  # no bound devices: everything is found message by message
        snapshots.append(set(service.held()))
        yield from bps.mv(devices.stage.coarse.x, 1.5)
        snapshots.append(set(service.held()))
        yield from bps.trigger(devices.det1, wait=True)
        snapshots.append(set(service.held()))

    RE(bp.count([], num=1))  # an empty plan works too
    RE(plan())
    assert snapshots == [set(), {"stage"}, {"stage", "det1"}]
    assert devices.stage.coarse.x.position == 1.5
    assert service.locks() == []


@pytest.mark.parametrize("preprocessor", [False, True])
def test_decorated_plan_locks_its_arguments_up_front(RE: RunEngine, coordinate: Any,
                                                     devices: Devices, service: Service,
                                                     preprocessor: bool) -> None:
    handle = coordinate()
    snapshots: list[set[str]] = []

    @coordinated_decorator(handle)
    def move_then_read(motor: Any, dets: list[Any]) -> Any:
        snapshots.append(set(service.held()))
        yield from bps.mv(motor, 2)
        for d in dets:
            yield from bps.trigger(d, wait=True)
        yield from bps.mv(devices.motor2, 1)  # not an argument: locked when touched
        snapshots.append(set(service.held()))
        return "done"

    if not preprocessor:  # only the decorator takes locks
        RE.preprocessors.clear()
    # With the preprocessor too, both wrappers share one set of locks (one key).
    RE(move_then_read(devices.motor1, [devices.det1, devices.det2]))
    assert snapshots == [{"motor1", "det1", "det2"}, {"motor1", "det1", "det2", "motor2"}]
    assert service.locks() == []


def test_no_lock_left_after_an_exception(RE: RunEngine, coordinate: Any, devices: Devices,
                                         service: Service) -> None:
    coordinate()

    def failing() -> Any:
        yield from bps.mv(devices.motor, 1)
        yield from bps.mv(devices.motor2, 1)
        raise RuntimeError("the plan broke")

    with pytest.raises(RuntimeError, match="the plan broke"):
        RE(failing())
    assert service.locks() == []


def _pausing_plan(devices: Devices) -> Any:
    yield from bps.checkpoint()
    yield from bps.mv(devices.motor, 1)
    yield from bps.trigger(devices.det, wait=True)
    yield Msg("pause", defer=False)
    yield from bps.mv(devices.motor, 2)


@pytest.mark.parametrize("how", ["stop", "abort"])
def test_no_lock_left_after_stop_or_abort(RE: RunEngine, coordinate: Any, devices: Devices,
                                          service: Service, how: str) -> None:
    coordinate()
    with pytest.raises(RunEngineInterrupted):
        RE(_pausing_plan(devices))
    assert set(service.held()) == {"motor", "det"}  # paused: still held
    getattr(RE, how)()
    assert RE.state == "idle"
    assert service.locks() == []
    assert devices.motor.position == 1


def test_stop_from_another_thread_mid_plan(RE: RunEngine, coordinate: Any, devices: Devices,
                                           service: Service, recorder: Recorder) -> None:
    coordinate()
    recorder.on_event(3, RE.stop, background=True)
    with pytest.raises(RunEngineInterrupted):
        RE(bp.count([devices.det], num=1000, delay=0.01), recorder)
    recorder.join()
    assert len(recorder.primary) < 1000
    assert service.locks() == []


def test_halt_leaves_locks_to_expire_with_their_lease(RE: RunEngine, coordinate: Any,
                                                      devices: Devices, service: Service) -> None:
    coordinate(lease=1.0)
    with pytest.raises(RunEngineInterrupted):
        RE(_pausing_plan(devices))
    RE.halt()
    assert RE.state == "idle"
    # A halt skips cleanup: the devices stay reserved ... until the lease runs out.
    assert set(service.held()) == {"motor", "det"}
    wait_until(lambda: service.locks() == [], timeout=5.0, what="the halted plan's locks expire")


def test_locks_kept_after_a_halt_can_be_released_on_purpose(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service) -> None:
    handle = coordinate(lease=30.0)
    with pytest.raises(RunEngineInterrupted):
        RE(_pausing_plan(devices))
    RE.halt()
    assert set(service.held()) == {"motor", "det"}
    handle.release_kept()
    assert service.locks() == []


def test_plan_longer_than_its_lease_keeps_its_locks(RE: RunEngine, coordinate: Any,
                                                    devices: Devices, service: Service,
                                                    recorder: Recorder) -> None:
    coordinate(lease=0.6)
    seen: list[dict[str, dict[str, Any]]] = []
    recorder.on_event(15, lambda: seen.append(service.held()))
    RE(bp.count([devices.det], num=15, delay=0.1), recorder)  # about 1.5 s: 2.5 leases
    recorder.join()
    assert set(seen[0]) == {"det"}
    assert service.locks() == []


def test_install_twice_replaces(RE: RunEngine, coordinate: Any, devices: Devices,
                                service: Service) -> None:
    first = coordinate()
    second = coordinate()
    assert not first.installed
    assert [p for p in RE.preprocessors if isinstance(p, CoordinatedPreprocessor)] == [
        second.preprocessor]
    assert [s for s in RE.suspenders if isinstance(s, LockPreemptedSuspender)] == [
        second.suspender]
    assert RE.preprocessors[-1] is second.preprocessor
    RE(bp.scan([devices.det], devices.motor, 0, 1, 3))
    assert service.locks() == []
    second.uninstall()
    assert not any(isinstance(p, CoordinatedPreprocessor) for p in RE.preprocessors)
    assert not RE.suspenders
    assert "coordination_lock" not in RE.commands


def test_device_held_by_maintenance_waits_then_fails(RE: RunEngine, coordinate: Any,
                                                      devices: Devices,
                                                      service: Service) -> None:
    import time

    coordinate(wait=1.0)
    service.lock("motor", "MAINTENANCE", "maint_bob", reason="replacing the encoder")
    start = time.monotonic()
    with pytest.raises(LockConflictError) as info:
        RE(bp.scan([devices.det], devices.motor, -1, 1, 5))
    waited = time.monotonic() - start
    text = str(info.value)
    for part in ("'motor'", "maint_bob", "MAINTENANCE", "replacing the encoder"):
        assert part in text
    assert waited >= 1.0
    assert devices.motor.position == 0  # moved nothing
    assert service.held() == {}  # no lock of the plan left (det was not taken either)
    assert set(service.held("maint_bob")) == {"motor"}


def test_device_refused_mid_plan_fails_there_and_cleans_up(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service) -> None:
    coordinate(wait=0.2)
    service.lock("motor2", "MAINTENANCE", "maint_bob", reason="bake-out")
    reached: list[str] = []

    def plan() -> Any:
        yield from bps.mv(devices.motor1, 3)
        reached.append("motor1 moved")
        try:
            yield from bps.mv(devices.motor2, 3)
            reached.append("motor2 moved")
        finally:
            reached.append("cleanup ran")

    with pytest.raises(LockConflictError, match="bake-out"):
        RE(plan())
    assert reached == ["motor1 moved", "cleanup ran"]
    assert devices.motor2.position == 0
    assert service.held() == {}


def test_operator_lock_preempted_for_the_plan_and_restored(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        recorder: Recorder) -> None:
    coordinate()
    service.lock("motor", "MANUAL_OPERATOR", "alice", reason="alignment")
    seen: list[list[dict[str, Any]]] = []
    recorder.on_event(2, lambda: seen.append(service.locks()))
    RE(bp.scan([devices.det], devices.motor, -1, 1, 4), recorder)
    recorder.join()

    during = {(lk["user_id"], lk["device_name"]): lk["state"] for lk in seen[0]}
    assert during[("alice", "motor")] == "preempted"
    assert during[(USER, "motor")] == "active"
    after = service.locks()
    assert [(lk["user_id"], lk["device_name"], lk["state"]) for lk in after] == [
        ("alice", "motor", "active")]


def test_plan_waits_for_a_device_freed_within_wait(RE: RunEngine, coordinate: Any,
                                                   devices: Devices, service: Service) -> None:
    import threading
    import time

    coordinate(wait=10.0)
    key = service.lock("det", "QUEUE_EXECUTING", "other_re", reason="another beamline plan",
                       timeout=30)
    freed: list[float] = []

    def free_later() -> None:
        time.sleep(0.5)
        freed.append(time.monotonic())
        service.release(key)

    threading.Thread(target=free_later, daemon=True).start()
    started: list[float] = []  # when the plan's first message ran

    def plan(dets: list[Any]) -> Any:
        yield Msg("null")  # the plan's first message waits for the up-front request
        started.append(time.monotonic())
        yield from bp.count(dets, num=2)

    RE(plan([devices.det]))  # the up-front request waits at the service until det is free
    assert started and freed and started[0] >= freed[0]
    assert service.locks() == []


def test_warns_when_a_preprocessor_is_added_after_install(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        caplog: pytest.LogCaptureFixture) -> None:
    coordinate()
    RE.preprocessors.append(SupplementalData(baseline=[devices.det2]))
    with caplog.at_level("WARNING", logger="bs_coordination.runengine.plans"):
        RE(bp.count([devices.det], num=1))
    assert "not the last entry of RE.preprocessors" in caplog.text
    assert service.locks() == []


def test_service_down_install_goes_on_and_plans_fail_closed(RE: RunEngine,
                                                            devices: Devices) -> None:
    import socket

    from bs_coordination.errors import ServiceError
    from bs_coordination.runengine.plugin import install

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handle = install(RE, f"http://127.0.0.1:{port}", USER, http_timeout=2)
    try:
        with pytest.raises(ServiceError, match="refusing to run the plan"):
            RE(bp.scan([devices.det], devices.motor, -1, 1, 3))
        assert devices.motor.position == 0
    finally:
        handle.uninstall()
