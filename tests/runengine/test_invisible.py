"""``install(RE)`` changes nothing a plan, a device or a callback can observe, except that
devices are coordinated: the same messages, the same documents, any device bluesky accepts
(no ``parent``, odd names, no name), and coordination that does not silently turn off."""

from __future__ import annotations

import logging
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.preprocessors import SupplementalData
from bluesky.utils import Msg
from ophyd.sim import SynAxis

from bs_coordination.errors import LockConflictError

from .conftest import Devices, Service


class Shutter:
    """A movable as bluesky's protocols allow it: ``name``, ``set``, ``read``, ``describe``,
    and no ``parent``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.position = 0.0

    def set(self, value: float) -> Any:
        from ophyd.status import Status

        self.position = value
        status = Status(obj=self)
        status.set_finished()
        return status

    def read(self) -> dict[str, Any]:
        return {self.name or "shutter": {"value": self.position, "timestamp": 0.0}}

    def describe(self) -> dict[str, Any]:
        return {self.name or "shutter": {"source": "test", "dtype": "number", "shape": []}}


def _streams(RE: RunEngine, plan: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What ``RE.msg_hook`` sees and the documents (name, content without uids and times)."""
    msgs: list[tuple[Any, ...]] = []
    docs: list[tuple[Any, ...]] = []
    RE.msg_hook = lambda msg: msgs.append((msg.command, msg.obj, msg.args))
    volatile = {"uid", "time", "run_start", "descriptor", "timestamps", "scan_id"}

    def keep(name: str, doc: dict[str, Any]) -> None:
        docs.append((name, sorted((k, repr(v)) for k, v in doc.items() if k not in volatile)))

    RE(plan, keep)
    RE.msg_hook = None
    return msgs, docs


def test_message_and_document_streams_are_the_same_with_the_plugin(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service) -> None:
    sd = SupplementalData(baseline=[devices.motor2])
    RE.preprocessors.append(sd)

    def plans() -> list[Any]:
        return [[Msg("null")],
                bp.scan([devices.det], devices.motor, -1, 1, 5),
                bp.grid_scan([devices.det1], devices.stage.coarse.x, 0, 1, 2,
                             devices.stage.coarse.y, 0, 1, 2),
                bps.mv(devices.motor1, 2)]

    without = [_streams(RE, plan) for plan in plans()]
    for d in (devices.motor, devices.motor1, devices.stage.coarse.x, devices.stage.coarse.y):
        d.set(0).wait(5)
    coordinate()  # appended after the SupplementalData
    with_plugin = [_streams(RE, plan) for plan in plans()]

    assert with_plugin[0][0] == [("null", None, ())]  # RE([Msg("null")]) sees only null
    assert [m for m, _ in with_plugin] == [m for m, _ in without]
    assert [d for _, d in with_plugin] == [d for _, d in without]
    assert service.locks() == []


def test_a_device_without_parent_is_coordinated(RE: RunEngine, coordinate: Any,
                                                service: Service) -> None:
    coordinate(wait=0.2)
    shutter = Shutter("shutter")
    held: list[set[str]] = []

    def plan() -> Any:
        yield from bps.abs_set(shutter, 2, wait=True)
        held.append(set(service.held()))

    RE(plan())
    assert shutter.position == 2 and held == [{"shutter"}]

    service.lock("shutter", "MAINTENANCE", "maint_bob", reason="interlock test")
    with pytest.raises(LockConflictError, match="interlock test"):
        RE(bps.abs_set(shutter, 3, wait=True))
    assert shutter.position == 2


def test_names_the_service_refuses_are_mapped_to_accepted_ones(
        RE: RunEngine, coordinate: Any, service: Service) -> None:
    coordinate(wait=0.2)
    spaced = SynAxis(name="sample x")
    held: list[set[str]] = []

    def plan() -> Any:
        yield from bps.mv(spaced, 1)
        held.append(set(service.held()))

    RE(plan())
    assert held == [{"sample_x"}] and spaced.position == 1
    # Maintenance on the mapped name reaches the device.
    service.lock("sample_x", "MAINTENANCE", "maint_bob", reason="sample change")
    with pytest.raises(LockConflictError, match="sample change"):
        RE(bps.mv(spaced, 2))
    assert spaced.position == 1


def test_an_unnamed_device_is_not_coordinated_and_said_so_once(
        RE: RunEngine, coordinate: Any, service: Service,
        caplog: pytest.LogCaptureFixture) -> None:
    coordinate()
    nameless = Shutter("")
    held: list[dict[str, Any]] = []

    def plan() -> Any:
        yield from bps.abs_set(nameless, 1, wait=True)
        held.append(service.held())

    with caplog.at_level(logging.WARNING, logger="bs_coordination"):
        RE(plan())
        RE(plan())
    assert nameless.position == 1 and held == [{}, {}]
    assert sum("has no name" in r.getMessage() for r in caplog.records) == 1


def test_replacing_preprocessors_keeps_coordination_and_says_so(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        caplog: pytest.LogCaptureFixture) -> None:
    handle = coordinate(wait=0.2)
    assert handle.status()["active"] is True and handle.status()["preprocessor"] is True
    RE.preprocessors = [SupplementalData(baseline=[devices.motor2])]
    status = handle.status()
    assert status["active"] is True and status["preprocessor"] is False
    assert any("RE.preprocessors" in p for p in status["problems"])

    held: list[set[str]] = []

    def plan() -> Any:
        yield from bp.count([devices.det], num=1)
        yield from bps.mv(devices.motor, 1)
        held.append(set(service.held()))

    with caplog.at_level(logging.WARNING, logger="bs_coordination"):
        RE(plan())
    assert held == [{"det", "motor", "motor2"}]  # the baseline device is locked too
    assert "did not pass through its preprocessor" in caplog.text
    assert service.locks() == []

    service.lock("motor", "MAINTENANCE", "maint_bob", reason="still coordinated")
    with pytest.raises(LockConflictError, match="still coordinated"):
        RE(bps.mv(devices.motor, 2))
    assert devices.motor.position == 1


def test_status_says_when_coordination_is_off(RE: RunEngine, coordinate: Any) -> None:
    handle = coordinate()
    RE.register_command("set", RE._set)  # a beamline re-registers a command after install()
    status = handle.status()
    assert status["active"] is False and status["commands"] is False
    assert any("registered again" in p for p in status["problems"])
    handle.uninstall()
    assert handle.status()["active"] is False and "uninstalled" in handle.status()["problems"]
