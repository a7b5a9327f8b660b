"""Discovery of the repository's own ``profile_collection_example/``."""

from __future__ import annotations

from pathlib import Path

import pytest
from bluesky_queueserver.manager.profile_ops import load_existing_plans_and_devices

from bs_coordination.service.discovery import (
    QS_FILE_NAME,
    DeviceInfo,
    DeviceRegistry,
    DiscoveryConfig,
    DiscoveryMode,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "profile_collection_example"
EXAMPLE_FILE = EXAMPLE / "startup" / QS_FILE_NAME

MOTOR = ("motor", (True, True, False), "SynAxis")
DETECTOR = ("detector", (True, False, False), "SynGauss")
DEVICE = ("device", (True, False, False))

#: Every device 00-devices.py defines: type, (readable, movable, flyable), class.
EXPECTED = {
    "motor": MOTOR, "motor1": MOTOR, "motor2": MOTOR,
    "det": DETECTOR, "det1": DETECTOR, "det2": DETECTOR,
    "stage": (*DEVICE, "SampleStage"),
}
#: The stage's tree.
STAGE = {
    "stage.coarse": (*DEVICE, "XYStage"), "stage.fine": (*DEVICE, "XYStage"),
    "stage.coarse.x": MOTOR, "stage.coarse.y": MOTOR,
    "stage.fine.x": MOTOR, "stage.fine.y": MOTOR,
}
SYN_AXIS_PARTS = {"readback", "setpoint", "velocity", "acceleration", "unused"}
SYN_GAUSS_PARTS = {"val", "Imax", "center", "sigma", "noise", "noise_multiplier"}


def check(node: DeviceInfo, expected: tuple[str, tuple[bool, bool, bool], str]) -> None:
    dtype, (readable, movable, flyable), cls = expected
    caps = node.capabilities
    assert node.device_type.value == dtype, node.name
    assert (caps.readable, caps.movable, caps.flyable) == (readable, movable, flyable), node.name
    assert node.device_class == cls, node.name


def parts(node: DeviceInfo) -> set[str]:
    return {c.name.rsplit(".", 1)[-1] for c in node.components}


@pytest.mark.parametrize("mode", ["auto", "load"])
async def test_every_example_device_is_listed(mode):
    reg = DeviceRegistry(DiscoveryConfig(path=str(EXAMPLE), mode=DiscoveryMode(mode)))
    status = await reg.reload()
    # auto reads the collection's existing_plans_and_devices.yaml; load runs its startup code
    # (RunEngine and plugin included).
    assert status.source.split(":")[0] == ("yaml" if mode == "auto" else "startup-dir")
    listed = {d.name: d for d in reg.list_devices().devices}
    assert set(listed) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        check(listed[name], expected)
    for name, expected in STAGE.items():
        check(reg.get_device(name), expected)
    assert parts(listed["stage"]) == {"coarse", "fine"}
    assert parts(reg.get_device("stage.coarse")) == {"x", "y"}
    for name in ("motor", "motor1", "motor2", "stage.fine.y"):
        assert parts(reg.get_device(name)) == SYN_AXIS_PARTS
    for name in ("det", "det1", "det2"):
        assert parts(listed[name]) == SYN_GAUSS_PARTS
    assert reg.get_device("stage.fine.y.setpoint").device_type.value == "signal"
    await reg.close()


@pytest.mark.parametrize("mode", ["auto", "load"])
async def test_example_export_round_trips(mode, tmp_path):
    """The export loads with the queue server's own loader of that file format, and says what
    the collection's own (generated) file says."""
    reg = DeviceRegistry(DiscoveryConfig(path=str(EXAMPLE), mode=DiscoveryMode(mode)))
    await reg.reload()
    out = tmp_path / QS_FILE_NAME
    out.write_text(reg.queueserver_yaml())
    plans, devices = load_existing_plans_and_devices(str(out))
    file_plans, file_devices = load_existing_plans_and_devices(str(EXAMPLE_FILE))
    assert devices == file_devices and set(devices) == set(EXPECTED)
    assert plans == file_plans and {"count", "scan", "move_then_count"} <= set(plans)
    await reg.close()
