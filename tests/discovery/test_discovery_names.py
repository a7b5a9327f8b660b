"""Name resolution, suggestions and path forms, without child processes (pure and fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bs_coordination.errors import DiscoveryError
from bs_coordination.service._discovery_worker import classify
from bs_coordination.service.discovery import (
    QS_FILE_NAME,
    DeviceCatalog,
    DiscoveryMode,
    resolve_source,
)


def node(name: str, dtype: str = "device", components: list[dict[str, Any]] | None = None,
         complete: bool = True, ophyd_name: str | None = None) -> dict[str, Any]:
    return {"name": name, "device_class": "X", "module": "m", "device_type": dtype,
            "capabilities": {"readable": True, "movable": dtype == "motor", "flyable": False},
            "ophyd_name": ophyd_name or name.replace(".", "_"), "components": components or [],
            "components_complete": complete}


CATALOG = DeviceCatalog.build({"devices": [
    node("motor1", "motor", [node("motor1.setpoint", "signal"),
                             node("motor1.readback", "signal")]),
    node("motor2", "motor"),
    node("stage", components=[node("stage.coarse", components=[
        node("stage.coarse.x", "motor"), node("stage.coarse.y", "motor")])]),
    node("det1", "detector", complete=False),  # an area detector: not expanded
    node("m_epics", "motor", ophyd_name="sample_x"),
]}, "test", 0.0)


@pytest.mark.parametrize("name", [
    "motor1", "motor1.setpoint", "stage", "stage.coarse", "stage.coarse.x",
    "det1", "det1.cam", "det1.cam.acquire", "m_epics", "sample_x"])
def test_known(name):
    assert CATALOG.knows(name)


@pytest.mark.parametrize("name", [
    "motor3", "motor1.velocity", "stage.coarse.z", "stage.fine", "stage.coarse.x.extra",
    "Motor1", "sample_x.user_setpoint"])
def test_unknown(name):
    assert not CATALOG.knows(name)


def test_alias_resolves_to_the_root():
    assert CATALOG.lookup("sample_x") is CATALOG.lookup("m_epics")


@pytest.mark.parametrize(("name", "best", "also"), [
    ("motr1", {"motor1", "motor2"}, {"motor1", "motor2"}),
    ("Motor1", {"motor1"}, set()),
    ("stage.coarse.z", {"stage.coarse.x", "stage.coarse.y"}, {"stage.coarse.x", "stage.coarse.y"}),
    ("stage.corse", {"stage.coarse"}, set()),
    ("motor1.setpont", {"motor1.setpoint"}, set()),
    ("sample_y", {"sample_x"}, set()),
])
def test_suggestions(name, best, also):
    got = CATALOG.suggestions(name)
    assert got and got[0] in best
    assert also <= set(got)


def test_no_suggestion_for_a_name_like_nothing():
    assert CATALOG.suggestions("zzzzzz") == []


def test_resolve_source_forms(tmp_path: Path):
    root = tmp_path / "pc"
    startup = root / "startup"
    startup.mkdir(parents=True)
    (startup / "00-a.py").write_text("")
    assert str(resolve_source(str(root), DiscoveryMode.AUTO)) == f"startup-dir: {startup}"
    assert str(resolve_source(str(startup), DiscoveryMode.AUTO)) == f"startup-dir: {startup}"
    script = startup / "00-a.py"
    assert str(resolve_source(str(script), DiscoveryMode.AUTO)) == f"startup-script: {script}"
    assert str(resolve_source("beamline.startup", DiscoveryMode.AUTO)) == (
        "startup-module: beamline.startup")
    (root / QS_FILE_NAME).write_text("existing_devices: {}\n")  # beside startup/
    assert resolve_source(str(root), DiscoveryMode.AUTO).kind == "yaml"
    assert resolve_source(str(root), DiscoveryMode.LOAD).kind == "startup-dir"
    (startup / QS_FILE_NAME).write_text("existing_devices: {}\n")  # the startup dir wins
    assert resolve_source(str(root), DiscoveryMode.YAML).target == str(startup / QS_FILE_NAME)
    with pytest.raises(DiscoveryError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"), DiscoveryMode.AUTO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiscoveryError, match="no startup files"):
        resolve_source(str(tmp_path / "empty"), DiscoveryMode.AUTO)
    (startup / QS_FILE_NAME).unlink()
    (root / QS_FILE_NAME).unlink()
    with pytest.raises(DiscoveryError, match="'yaml' needs"):
        resolve_source(str(root), DiscoveryMode.YAML)
    only_yaml = tmp_path / "only.yaml"
    only_yaml.write_text("existing_devices: {}\n")
    assert resolve_source(str(only_yaml), DiscoveryMode.AUTO).kind == "yaml"
    with pytest.raises(DiscoveryError, match="'load' needs startup code"):
        resolve_source(str(only_yaml), DiscoveryMode.LOAD)


def test_classify_by_name_when_the_class_is_unknown():
    # Classes defined in startup files are not importable from a YAML description.
    assert classify(None, "MyShutterSignal", "__main__", True, True, False) == "signal"
    assert classify(None, "Flyer", "__main__", False, False, True) == "flyer"
    assert classify(None, "Slits", "__main__", True, True, False) == "motor"
    assert classify(None, "MyDetector", "__main__", True, False, False) == "detector"
    assert classify(None, "SampleStage", "__main__", True, False, False) == "device"


def test_classify_by_class():
    from ophyd import Device, EpicsMotor, EpicsSignal
    from ophyd.sim import SynAxis, SynGauss

    assert classify(EpicsSignal, "EpicsSignal", "ophyd.signal", True, True, False) == "signal"
    assert classify(SynAxis, "SynAxis", "ophyd.sim", True, True, False) == "motor"
    assert classify(EpicsMotor, "EpicsMotor", "ophyd.epics_motor", True, True, False) == "motor"
    assert classify(SynGauss, "SynGauss", "ophyd.sim", True, False, False) == "detector"
    assert classify(Device, "Device", "ophyd.device", True, False, False) == "device"
