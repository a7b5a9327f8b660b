"""Maintenance takes a device from a running plan: the RunEngine suspends, and resumes by
itself when the device is handed back; killed RunEngines lose their locks with the lease."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import pytest
from bluesky import RunEngine
from bluesky.utils import Msg, RunEngineInterrupted

from .conftest import Devices, Recorder, Service, TcpProxy, wait_until


def test_maintenance_preemption_suspends_the_plan_until_released(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        recorder: Recorder) -> None:
    handle = coordinate()
    RE.record_interruptions = True
    motor = devices.slow_motor
    seen: dict[str, Any] = {}

    touched: list[tuple[float, str]] = []  # (when, command) of messages to the motor
    RE.msg_hook = lambda msg: touched.append((time.monotonic(), msg.command)) if (
        msg.obj is motor) else None

    def maintenance() -> None:
        key = service.lock("slow_motor", "MAINTENANCE", "maint_bob",
                           reason="replacing the encoder")
        granted = time.monotonic()
        wait_until(lambda: recorder.interruptions, timeout=5.0, what="the suspension")
        seen["suspended"] = suspended = time.monotonic()
        seen["suspended_after"] = suspended - granted
        # A move sent before the RunEngine heard of the preemption may still be finishing.
        wait_until(lambda: motor.readback.get() == motor.setpoint.get(), what="motion ends")
        position, events = motor.position, len(recorder.primary)
        time.sleep(0.5)  # maintenance works on the motor for a while
        seen["position_before"], seen["position_after"] = position, motor.position
        seen["events_while_held"] = len(recorder.primary) - events
        seen["tripped"] = handle.suspender.tripped
        seen["plan_lock"] = service.held()["slow_motor"]["state"]
        seen["released"] = time.monotonic()
        service.release(key)

    recorder.on_event(5, maintenance, background=True)
    RE(bp.scan([devices.det], motor, 0, 10, 30), recorder)
    recorder.join()

    assert seen["suspended_after"] < 1.0
    assert seen["position_after"] == seen["position_before"]
    assert seen["events_while_held"] == 0
    # While suspended, nothing but the RunEngine's own stop() reached the motor.
    assert {cmd for t, cmd in touched if seen["suspended"] <= t < seen["released"]} <= {"stop"}
    assert seen["tripped"] is True
    assert seen["plan_lock"] == "preempted"  # kept, waiting under the maintenance lock
    why = recorder.interruptions[0]
    for part in ("slow_motor", "maint_bob", "MAINTENANCE", "replacing the encoder"):
        assert part in why
    # ... then the plan resumed by itself and finished every point.
    assert sorted({e["seq_num"] for e in recorder.primary}) == list(range(1, 31))
    assert motor.position == pytest.approx(10)
    assert not handle.suspender.tripped
    assert service.locks() == []


def test_preemption_while_paused_suspends_when_resumed(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        recorder: Recorder) -> None:
    handle = coordinate()
    RE.record_interruptions = True

    @bpp.run_decorator()
    def plan() -> Any:
        yield from bps.checkpoint()
        yield from bps.mv(devices.motor, 1)
        yield Msg("pause", defer=False)
        yield from bps.mv(devices.motor, 2)

    with pytest.raises(RunEngineInterrupted):
        RE(plan(), recorder)
    key = service.lock("motor", "MAINTENANCE", "maint_bob", reason="cable check")
    wait_until(lambda: handle.suspender.tripped, what="the suspender trips")
    seen: dict[str, Any] = {}

    def maintenance() -> None:
        wait_until(lambda: any("maint_bob" in j for j in recorder.interruptions),
                   what="the suspension after resume")
        time.sleep(0.3)  # maintenance holds the motor for a while
        seen["position_while_held"] = devices.motor.position
        service.release(key)

    import threading

    worker = threading.Thread(target=maintenance, daemon=True)
    worker.start()
    RE.resume()  # suspends at once, resumes by itself after the release, finishes
    worker.join(10)
    assert seen["position_while_held"] == 1
    assert devices.motor.position == 2
    assert service.locks() == []


def test_maintenance_on_a_component_suspends_the_plan_holding_its_root(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        recorder: Recorder) -> None:
    handle = coordinate()
    RE.record_interruptions = True
    seen: dict[str, Any] = {}

    def maintenance() -> None:
        key = service.lock("stage.coarse", "MAINTENANCE", "maint_bob", reason="limit switch")
        wait_until(lambda: recorder.interruptions, what="the suspension")
        seen["why"] = recorder.interruptions[0]
        service.release(key)

    recorder.on_event(3, maintenance, background=True)
    RE(bp.scan([devices.det], devices.stage.coarse.x, 0, 1, 10), recorder)
    recorder.join()
    assert "'stage'" in seen["why"] and "'stage.coarse'" in seen["why"]
    assert sorted({e["seq_num"] for e in recorder.primary}) == list(range(1, 11))
    assert not handle.suspender.tripped
    assert service.locks() == []


def test_lost_event_stream_suspends_and_a_missed_preemption_is_caught_after_reconnect(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        recorder: Recorder, proxy: TcpProxy) -> None:
    handle = coordinate(url=proxy.url)  # the RunEngine reaches the service through the proxy
    RE.record_interruptions = True
    motor = devices.slow_motor
    seen: dict[str, Any] = {}

    def outage_then_maintenance() -> None:
        proxy.cut()
        wait_until(lambda: recorder.interruptions, what="the suspension on the lost stream")
        seen["first_why"] = recorder.interruptions[0]
        wait_until(lambda: motor.readback.get() == motor.setpoint.get(), what="motion ends")
        # Maintenance takes the motor while the RunEngine cannot hear of it.
        key = service.lock("slow_motor", "MAINTENANCE", "maint_bob", reason="while offline")
        position = motor.position
        proxy.restore()
        wait_until(lambda: handle.coordinator.client.websocket_connected, timeout=15,
                   what="the event stream reconnects")
        wait_until(lambda: "maint_bob" in handle.suspender.why,
                   what="the suspender learns of the missed preemption")
        time.sleep(0.3)  # still suspended: maintenance holds the motor
        seen["tripped"] = handle.suspender.tripped
        seen["moved"] = bool(motor.position != position)
        service.release(key)

    recorder.on_event(3, outage_then_maintenance, background=True)
    RE(bp.scan([devices.det], motor, 0, 1, 20), recorder)
    recorder.join()
    assert "lost contact with the lock service" in seen["first_why"]
    assert seen["tripped"] is True
    assert seen["moved"] is False
    assert sorted({e["seq_num"] for e in recorder.primary}) == list(range(1, 21))
    assert service.locks() == []


def test_killed_runengine_loses_its_locks_after_the_lease(live_service: Any,
                                                          service: Service) -> None:
    script = textwrap.dedent(f"""
        import bluesky.plans as bp
        from bluesky import RunEngine
        from ophyd.sim import det, motor
        from bs_coordination import install

        RE = RunEngine({{}})
        install(RE, {live_service.url!r}, "doomed_re", lease=1.0)
        RE(bp.scan([det], motor, 0, 1, 100000))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: set(service.held("doomed_re")) == {"det", "motor"}, timeout=30,
                   what="the plan in the child process takes its locks")
        time.sleep(1.5)  # longer than the lease: the heartbeat keeps them
        assert set(service.held("doomed_re")) == {"det", "motor"}
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: not service.held("doomed_re"), timeout=5.0,
               what="the killed RunEngine's locks expire")


def test_with_api_keys_the_plan_follows_its_principal(
        RE: RunEngine, service_factory: Any, devices: Devices, recorder: Recorder,
        tmp_path: Any) -> None:
    import hashlib
    import json

    keys = {"qs-key-123": ("beamline_queue", ["queue"]), "admin-key-456": ("maint_bob", ["admin"])}
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"api_keys": [
        {"principal": p, "roles": roles, "key_sha256": hashlib.sha256(k.encode()).hexdigest()}
        for k, (p, roles) in keys.items()]}))
    live = service_factory("memory", api_keys=str(key_file))
    admin = Service(live.url, api_key="admin-key-456")
    from bs_coordination.runengine.plugin import install

    # user_id says "queue_server", but the service records the key's principal.
    handle = install(RE, live.url, "queue_server", wait=2, lease=30, api_key="qs-key-123")
    RE.record_interruptions = True
    seen: dict[str, Any] = {}

    def maintenance() -> None:
        seen["held"] = admin.held("beamline_queue")
        key = admin.lock("slow_motor", "MAINTENANCE", "ignored", reason="auth check")
        wait_until(lambda: recorder.interruptions, what="the suspension")
        admin.release(key)

    try:
        recorder.on_event(3, maintenance, background=True)
        RE(bp.scan([devices.det], devices.slow_motor, 0, 1, 10), recorder)
        recorder.join()
    finally:
        handle.uninstall()
    assert set(seen["held"]) == {"det", "slow_motor"}
    assert "maint_bob" in recorder.interruptions[0]
    assert sorted({e["seq_num"] for e in recorder.primary}) == list(range(1, 11))
    assert admin.locks() == []
    admin.close()
