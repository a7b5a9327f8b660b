"""What ``install`` does to the RunEngine itself: it checks messages in the command dispatch
(so it also sees what later preprocessors and earlier registered commands do), chains the
state hook, and ``uninstall`` gives the RunEngine back as it was."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.preprocessors import SupplementalData
from bluesky.utils import Msg

from bs_coordination.errors import LockConflictError

from .conftest import Devices, Recorder, Service


def test_uninstall_gives_the_runengine_back_as_it_was(RE: RunEngine, coordinate: Any,
                                                      devices: Devices,
                                                      service: Service) -> None:
    transitions: list[tuple[str, str]] = []

    def user_hook(new: str, old: str) -> None:
        transitions.append((str(old), str(new)))

    RE.state_hook = user_hook
    # bluesky has no public getter for a command: compare the registry itself.
    before = dict(RE._command_registry)
    handle = coordinate()
    RE(bp.count([devices.det], num=1))
    assert transitions == [("idle", "running"), ("running", "idle")]  # still told
    handle.uninstall()
    assert RE.state_hook is user_hook
    assert dict(RE._command_registry) == before

    service.lock("motor", "MAINTENANCE", "maint_bob", reason="after uninstall")
    RE(bps.mv(devices.motor, 1))  # nothing coordinates this RunEngine any more
    assert devices.motor.position == 1
    assert set(service.held()) == set()


def test_baseline_added_after_install_is_locked_when_read(RE: RunEngine, coordinate: Any,
                                                          devices: Devices, service: Service,
                                                          recorder: Recorder) -> None:
    coordinate()
    RE.preprocessors.append(SupplementalData(baseline=[devices.det2]))
    seen: list[set[str]] = []
    recorder.on_event(1, lambda: seen.append(set(service.held())))
    RE(bp.count([devices.det], num=1), recorder)
    recorder.join()
    assert seen == [{"det", "det2"}]
    assert service.locks() == []


def test_a_command_registered_before_install_is_checked(RE: RunEngine, coordinate: Any,
                                                        devices: Devices,
                                                        service: Service) -> None:
    seen: list[set[str]] = []

    async def nudge(msg: Msg) -> None:  # a beamline's own command acting on a device
        seen.append(set(service.held()))
        msg.obj.set(msg.obj.position + msg.args[0]).wait(5)

    RE.register_command("nudge", nudge)
    coordinate(wait=0.2)

    def plan() -> Any:  # no bound devices: only the message names the motor
        yield Msg("nudge", devices.motor1, 0.5)

    RE(plan())
    assert seen == [{"motor1"}]
    assert devices.motor1.position == 0.5

    service.lock("motor1", "MAINTENANCE", "maint_bob", reason="alignment")
    with pytest.raises(LockConflictError, match="alignment"):
        RE(plan())
    assert devices.motor1.position == 0.5  # refused before the command ran
    assert set(service.held()) == set()


def test_state_hook_replaced_after_install_still_ends_the_plan(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        caplog: pytest.LogCaptureFixture) -> None:
    coordinate()
    states: list[str] = []
    RE.state_hook = lambda new, old: states.append(str(new))
    with caplog.at_level("WARNING", logger="bs_coordination.runengine.plugin"):
        RE(bp.count([devices.det], num=1))
    assert "state_hook was replaced" in caplog.text
    assert states == ["running", "idle"]  # the new hook is kept, in the chain
    assert service.locks() == []
