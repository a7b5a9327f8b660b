"""A preemption that arrives after a plan's run has closed (the plan goes on moving the motor
outside any run) suspends it and it resumes by itself, as inside a run."""

from __future__ import annotations

import threading
import time
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine

from .conftest import Devices, Service, wait_until


def test_a_preemption_after_close_run_suspends_and_resumes(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service) -> None:
    handle = coordinate()
    motor = devices.motor
    closed = threading.Event()
    seen: dict[str, Any] = {}

    def plan():
        yield from bp.count([devices.det])
        closed.set()
        for i in range(1, 41):
            yield from bps.mv(motor, i)
            yield from bps.sleep(0.02)

    def maintenance() -> None:
        closed.wait(10)
        time.sleep(0.1)
        key = service.lock("motor", "MAINTENANCE", "maint_bob")
        wait_until(lambda: handle.suspender.tripped, what="the suspension")
        position = motor.position
        time.sleep(0.3)
        seen["moved_while_held"] = motor.position != position
        service.release(key)

    t = threading.Thread(target=maintenance)
    t.start()
    RE(plan())
    t.join()
    assert seen["moved_while_held"] is False
    assert motor.position == pytest.approx(40)
    assert RE.state == "idle"
