"""Profile collections written by the tests, for device discovery (helpers and fixtures).

``write_collection(root, files)`` lays out ``root/startup/<files>``, as a beamline's profile
collection is laid out. ``SIM_STARTUP`` is a small collection of ``ophyd.sim`` devices: two
motors, a detector, a flyer, a sample stage with nested components, a device whose ophyd name
differs from its variable, a RunEngine and a plan (neither is a device).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SIM_STARTUP = textwrap.dedent(
    """
    from ophyd import Component as Cpt, Device
    from ophyd.sim import SynAxis, SynGauss, motor1, motor2, flyer1
    from bluesky import RunEngine
    from bluesky.plans import count, scan

    class XY(Device):
        x = Cpt(SynAxis)
        y = Cpt(SynAxis)

    class SampleStage(Device):
        coarse = Cpt(XY, "")
        fine = Cpt(XY, "")

    stage = SampleStage(name="stage")
    det = SynGauss("det", motor1, "motor1", center=0, Imax=1, sigma=1)
    sample_x = SynAxis(name="sx")
    RE = RunEngine({})
    print("startup output on stdout must not confuse discovery")
    """
)

#: Root devices of SIM_STARTUP, with their expected type and capabilities
#: (readable, movable, flyable).
SIM_DEVICES = {
    "motor1": ("motor", (True, True, False)),
    "motor2": ("motor", (True, True, False)),
    "det": ("detector", (True, False, False)),
    "flyer1": ("flyer", (False, False, True)),
    "stage": ("device", (True, False, False)),
    "sample_x": ("motor", (True, True, False)),
}

#: An EPICS device: PV names are known to ophyd without any IOC running (caproto client).
EPICS_STARTUP = textwrap.dedent(
    """
    import ophyd
    ophyd.set_cl("caproto")
    from ophyd import Component as Cpt, Device, EpicsMotor, EpicsSignal, EpicsSignalRO

    class Shutter(Device):
        status = Cpt(EpicsSignalRO, "Pos-Sts")
        cmd = Cpt(EpicsSignal, "Cmd", write_pv="Cmd-SP")
        # Lazy: built on first access, which must not wait for a PV that never connects.
        interlock = Cpt(EpicsSignalRO, "Ilk-Sts", lazy=True)

    shutter = Shutter("XF:31ID-PPS{Sh:1}", name="shutter")
    m1 = EpicsMotor("XF:31ID{Mtr:1}", name="m1")
    """
)

#: ophyd-async devices: a nested soft device, and an EPICS motor (never connected).
ASYNC_STARTUP = textwrap.dedent(
    """
    from ophyd_async.core import StandardReadable, soft_signal_rw
    from ophyd_async.epics.motor import Motor

    class Sensor(StandardReadable):
        def __init__(self, name=""):
            with self.add_children_as_readables():
                self.value = soft_signal_rw(float)
            self.mode = soft_signal_rw(str)
            super().__init__(name=name)

    class Table(StandardReadable):
        def __init__(self, name=""):
            self.sensor = Sensor()
            super().__init__(name=name)

    table = Table(name="table")
    m_async = Motor("XF:31ID{Mtr:2}", name="m_async")
    """
)


def write_collection(root: Path, files: dict[str, str]) -> Path:
    """Write ``root/startup/<name>`` for each file; return ``root``."""
    startup = root / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    for old in startup.glob("*.py"):
        old.unlink()
    for name, text in files.items():
        (startup / name).write_text(text)
    return root


@pytest.fixture
def sim_collection(tmp_path: Path) -> Path:
    """A collection directory (holding ``startup/``) with ``SIM_STARTUP``."""
    return write_collection(tmp_path / "profile_sim", {"00-devices.py": SIM_STARTUP})


@pytest.fixture
def epics_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channel access searches (inherited by the discovery child) stay on loopback."""
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
    monkeypatch.setenv("EPICS_CA_CONN_TMO", "1")


def qserver_list_plans_devices(startup_dir: Path, out_dir: Path) -> Path:
    """Run the queue server's own ``qserver-list-plans-devices``; return the file it wrote."""
    tool = Path(sys.executable).parent / "qserver-list-plans-devices"
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(tool), "--startup-dir", str(startup_dir), "--file-dir", str(out_dir)],
                   check=True, capture_output=True, timeout=120)
    return out_dir / "existing_plans_and_devices.yaml"
