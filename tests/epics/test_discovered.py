"""Devices and records from the service's discovery: ``epics-acf`` and ``epics-bridge`` without
``--device`` use the ophyd devices of the profile collection and their EPICS write PVs."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from ca_parts import wait_until
from test_access_security import lock

from bs_coordination.cli import main
from bs_coordination.models import LockType

pytestmark = pytest.mark.epics

STARTUP = textwrap.dedent("""
    import ophyd
    ophyd.set_cl("caproto")
    from ophyd import EpicsMotor, EpicsSignal
    from ophyd.sim import SynAxis

    m1 = EpicsMotor("TST:mtr", name="m1")
    valve = EpicsSignal("TST:valve-RB", write_pv="TST:valve-SP", name="valve")
    sim = SynAxis(name="sim")
""")


def discovering_service(service_factory, tmp_path: Path):
    startup = tmp_path / "profile" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-devices.py").write_text(STARTUP)
    service = service_factory(profile_collection=str(startup.parent))
    deadline = time.monotonic() + 60
    while True:  # discovery runs in a child process after the service started
        with urllib.request.urlopen(service.url + "/api/device-config/status") as answer:
            status = json.load(answer)
        if status["ready"]:
            return service
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_acf_and_bridge_from_the_discovered_devices(service_factory, tmp_path, capsys, ca,
                                                    ioc_factory, bridge_factory, ca_users):
    service = discovering_service(service_factory, tmp_path)
    code = main(["epics-acf", "--url", service.url, "--prefix", "DISC:", "--queue-user",
                 "queue_server", "--operator-user", "alice", "--maintenance-user", "bob"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out
    # Every record an ophyd device writes, in its device's group; sim devices have none.
    assert '#   record TST:mtr: field(ASG, "m1")' in text
    assert '#   record TST:valve-SP: field(ASG, "valve")' in text
    assert "TST:valve-RB" not in text  # read-only: left in its group
    assert "ASG(sim)" not in text
    ioc_factory(text, {"TST:mtr": "m1", "TST:valve-SP": "valve"})
    bridge_factory(service.url, "DISC:", [])  # no --device: every discovered device
    alice, queue = ca_users("alice"), ca_users("queue_server")
    assert alice.read("DISC:sim:LOCK") is not None  # served although the IOC has no record
    wait_until(lambda: alice.can_write("TST:mtr"), 15, "alice writes the free m1")
    lock(service.url, "m1", LockType.QUEUE_EXECUTING, "queue_server")
    wait_until(lambda: not alice.can_write("TST:mtr"), 2, "the IOC refuses alice on m1")
    assert alice.write("TST:mtr", 1.0) == 0.0
    assert queue.write("TST:mtr", 2.0) == 2.0
    assert alice.write("TST:valve-SP", 3.0) == 3.0  # another device: still free


def test_acf_says_when_the_service_knows_no_epics_device(live_service, capsys):
    code = main(["epics-acf", "--url", live_service.url, "--maintenance-user", "bob"])
    assert code == 64
    assert "knows no device with EPICS write PVs" in capsys.readouterr().err


def test_bridge_refuses_bad_devices_and_prefixes_before_serving(capsys):
    assert main(["epics-bridge", "--device", "m1.user_setpoint"]) == 64
    assert "component" in capsys.readouterr().err
    assert main(["epics-bridge", "--device", "m1", "--prefix", 'BL"']) == 64
    assert "--prefix 'BL\"'" in capsys.readouterr().err
