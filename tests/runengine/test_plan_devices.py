"""Which devices the wrapper finds: bound arguments up front, roots of components, devices in
``msg.args`` of ``collect``/``locate`` (no RunEngine, no service)."""

from __future__ import annotations

import bluesky.plans as bp
import pytest
from bluesky.preprocessors import SupplementalData
from bluesky.utils import Msg

from bs_coordination.errors import InvalidRequestError
from bs_coordination.runengine._tracker import PlanLocks
from bs_coordination.runengine.plans import _needed, device_name, is_device, plan_devices

from .conftest import Devices


def names(objs: list[object]) -> set[str]:
    return {device_name(o) for o in objs}


def test_bound_arguments_of_a_plan(devices: Devices) -> None:
    plan = bp.grid_scan([devices.det, devices.det1], devices.stage.coarse.y, 0, 1, 2,
                        devices.stage.coarse.x, 0, 1, 2)
    assert names(plan_devices(plan)) == {"det", "det1", "stage"}


def test_wrapped_plans_and_baseline_devices(devices: Devices) -> None:
    sd = SupplementalData(baseline=[devices.det2], monitors=[devices.motor1])
    plan = sd(bp.count([devices.det]))
    assert names(plan_devices(plan)) == {"det", "det2", "motor1"}


def test_a_list_of_messages(devices: Devices) -> None:
    plan = [Msg("set", devices.motor, 1), Msg("read", devices.det)]
    assert names(plan_devices(plan)) == {"motor", "det"}


def test_components_lock_their_root_and_non_devices_are_not_devices(devices: Devices) -> None:
    assert device_name(devices.stage.coarse.x.setpoint) == "stage"
    assert not is_device("motor") and not is_device(3.0) and not is_device(None)
    assert is_device(devices.motor.readback)


def test_collect_and_locate_carry_devices_in_args(devices: Devices) -> None:
    session = PlanLocks(plan_uid=None, reason=None, wait=0)
    msg = Msg("locate", devices.motor1, devices.motor2, devices.stage.coarse.y)
    assert set(_needed(msg, session)) == {"motor1", "motor2", "stage"}
    msg = Msg("collect", devices.det, devices.det1, stream=True)
    assert set(_needed(msg, session)) == {"det", "det1"}


def test_an_unnamed_device_cannot_be_locked(devices: Devices) -> None:
    devices.motor.name = ""
    with pytest.raises(InvalidRequestError, match="no usable name"):
        device_name(devices.motor)
