"""Device discovery through real child processes running bluesky-queueserver's loader."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest
import yaml
from bluesky_queueserver.manager.profile_ops import load_existing_plans_and_devices
from discovery_collections import (
    ASYNC_STARTUP,
    EPICS_STARTUP,
    SIM_DEVICES,
    SIM_STARTUP,
    qserver_list_plans_devices,
    write_collection,
)

from bs_coordination.errors import DiscoveryError, UnknownDeviceError
from bs_coordination.service.discovery import (
    QS_FILE_NAME,
    DeviceInfo,
    DeviceRegistry,
    DiscoveryConfig,
    DiscoveryMode,
    DiscoveryState,
)


def registry(path: Path | str | None, mode: str = "load", timeout: float = 60.0,
             strict: bool = False) -> DeviceRegistry:
    return DeviceRegistry(DiscoveryConfig(path=str(path) if path else None,
                                          mode=DiscoveryMode(mode), timeout=timeout,
                                          strict=strict))


def names(node: DeviceInfo) -> set[str]:
    out = {node.name}
    for c in node.components:
        out |= names(c)
    return out


async def test_every_device_listed_with_type_capabilities_and_components(sim_collection):
    reg = registry(sim_collection)
    status = await reg.reload()
    assert status.state == DiscoveryState.LOADED
    assert status.source == f"startup-dir: {(sim_collection / 'startup').resolve()}"
    listed = {d.name: d for d in reg.list_devices().devices}
    assert set(listed) == set(SIM_DEVICES)  # RE and the plans are not devices
    assert status.count == len(SIM_DEVICES)
    for name, (dtype, (readable, movable, flyable)) in SIM_DEVICES.items():
        d = listed[name]
        assert d.device_type.value == dtype, name
        caps = d.capabilities
        assert (caps.readable, caps.movable, caps.flyable) == (readable, movable, flyable), name
    assert listed["motor1"].device_class == "SynAxis"
    assert listed["motor1"].module == "ophyd.sim"
    assert listed["stage"].device_class == "SampleStage"
    # Nested components, with dotted names from the root.
    stage = names(listed["stage"])
    assert {"stage.coarse", "stage.fine", "stage.coarse.x", "stage.coarse.y",
            "stage.fine.x.readback", "stage.fine.x.setpoint"} <= stage
    x = reg.get_device("stage.coarse.x")
    assert x.device_type.value == "motor" and x.capabilities.movable
    assert reg.get_device("stage.coarse").device_type.value == "device"
    assert reg.get_device("motor1.setpoint").device_type.value == "signal"
    assert reg.get_device("det.val").device_type.value == "signal"
    # The ophyd name of a root is known too (the RunEngine plugin locks `obj.name`).
    assert listed["sample_x"].ophyd_name == "sx"
    assert reg.get_device("sx").name == "sample_x"
    assert status.component_count == sum(len(names(d)) for d in listed.values())
    # Filter by type.
    assert {d.name for d in reg.list_devices(device_type="motor").devices} == {
        "motor1", "motor2", "sample_x"}
    await reg.close()


async def test_epics_pv_names(tmp_path, epics_env):
    reg = registry(write_collection(tmp_path / "pc", {"00-epics.py": EPICS_STARTUP}))
    await reg.reload()
    shutter = reg.get_device("shutter")
    assert shutter.prefix == "XF:31ID-PPS{Sh:1}"
    status = reg.get_device("shutter.status")
    assert (status.read_pv, status.write_pv) == ("XF:31ID-PPS{Sh:1}Pos-Sts", None)
    cmd = reg.get_device("shutter.cmd")
    assert (cmd.read_pv, cmd.write_pv) == ("XF:31ID-PPS{Sh:1}Cmd", "XF:31ID-PPS{Sh:1}Cmd-SP")
    assert reg.get_device("shutter.interlock").read_pv == "XF:31ID-PPS{Sh:1}Ilk-Sts"
    assert reg.get_device("shutter").components_complete
    exported = yaml.load(reg.queueserver_yaml(), Loader=yaml.FullLoader)["existing_devices"]
    assert set(exported["shutter"]["components"]) == {"status", "cmd", "interlock"}
    m1 = reg.get_device("m1")
    assert m1.device_type.value == "motor" and m1.device_class == "EpicsMotor"
    assert reg.get_device("m1.user_setpoint").read_pv == "XF:31ID{Mtr:1}.VAL"
    assert reg.get_device("m1.user_readback").read_pv == "XF:31ID{Mtr:1}.RBV"
    await reg.close()


async def test_ophyd_async_devices(tmp_path, epics_env):
    reg = registry(write_collection(tmp_path / "pc", {"00-async.py": ASYNC_STARTUP}))
    await reg.reload()
    assert {d.name for d in reg.list_devices().devices} == {"table", "m_async"}
    table = reg.get_device("table")
    assert table.device_type.value == "device" and table.capabilities.readable
    assert reg.get_device("table.sensor").device_class == "Sensor"
    value = reg.get_device("table.sensor.value")
    assert value.device_type.value == "signal" and value.device_class == "SignalRW"
    motor = reg.get_device("m_async")
    assert motor.device_type.value == "motor"  # movable (and flyable): a motor
    assert motor.capabilities.movable and motor.capabilities.readable
    setpoint = reg.get_device("m_async.user_setpoint")
    assert (setpoint.read_pv, setpoint.write_pv) == ("XF:31ID{Mtr:2}.VAL", "XF:31ID{Mtr:2}.VAL")
    readback = reg.get_device("m_async.user_readback")
    assert (readback.read_pv, readback.write_pv) == ("XF:31ID{Mtr:2}.RBV", None)
    stop = reg.get_device("m_async.motor_stop")
    assert (stop.read_pv, stop.write_pv) == (None, "XF:31ID{Mtr:2}.STOP")
    await reg.close()


async def test_devices_excluded_from_the_queue_server_are_not_listed(tmp_path):
    root = write_collection(tmp_path / "pc", {
        "00-devices.py": SIM_STARTUP,
        "01-register.py": "from bluesky_queueserver import register_device\n"
                          "register_device('motor2', exclude=True)\n",
    })
    reg = registry(root)
    await reg.reload()
    assert {d.name for d in reg.list_devices().devices} == set(SIM_DEVICES) - {"motor2"}
    exported = yaml.load(reg.queueserver_yaml(), Loader=yaml.FullLoader)["existing_devices"]
    assert set(exported) == set(SIM_DEVICES) - {"motor2"}
    await reg.close()


@pytest.mark.parametrize("form", ["collection", "startup_dir", "script", "module"])
async def test_path_forms(tmp_path, monkeypatch, form):
    root = write_collection(tmp_path / "pc", {"00-devices.py": SIM_STARTUP})
    if form == "collection":
        path = str(root)
    elif form == "startup_dir":
        path = str(root / "startup")
    elif form == "script":
        path = str(root / "startup" / "00-devices.py")
    else:
        (tmp_path / "beamline_startup_mod.py").write_text(SIM_STARTUP)
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # inherited by the child
        path = "beamline_startup_mod"
    reg = registry(path)
    status = await reg.reload()
    assert status.source.split(":")[0] == {
        "collection": "startup-dir", "startup_dir": "startup-dir",
        "script": "startup-script", "module": "startup-module"}[form]
    assert {d.name for d in reg.list_devices().devices} == set(SIM_DEVICES)
    await reg.close()


async def test_queueserver_export_round_trips_and_matches_the_queue_servers_own(
        sim_collection, tmp_path):
    reg = registry(sim_collection)
    await reg.reload()
    exported = tmp_path / "export" / QS_FILE_NAME
    exported.parent.mkdir()
    exported.write_text(reg.queueserver_yaml())
    plans, devices = load_existing_plans_and_devices(str(exported))
    # What `qserver-list-plans-devices` writes for the same collection.
    reference = qserver_list_plans_devices(sim_collection / "startup", tmp_path / "reference")
    ref_plans, ref_devices = load_existing_plans_and_devices(str(reference))
    assert devices == ref_devices
    assert set(plans) == set(ref_plans) and {"count", "scan"} <= set(plans)
    assert set(devices) == set(SIM_DEVICES)
    assert devices["stage"]["components"]["coarse"]["components"]["x"]["is_movable"] is True
    await reg.close()


async def test_yaml_fast_path(sim_collection, tmp_path):
    # Write the file the queue server's own tool writes, in the startup directory.
    qs_file = qserver_list_plans_devices(sim_collection / "startup",
                                         sim_collection / "startup").resolve()
    # auto (the default) takes the file; the startup code is not run.
    (sim_collection / "startup" / "99-boom.py").write_text("raise RuntimeError('not run')\n")
    reg = registry(sim_collection, mode="auto")
    status = await reg.reload()
    assert status.source == f"yaml: {qs_file}"
    listed = {d.name: d for d in reg.list_devices().devices}
    assert set(listed) == set(SIM_DEVICES)
    for name, (dtype, (readable, movable, flyable)) in SIM_DEVICES.items():
        caps = listed[name].capabilities
        assert listed[name].device_type.value == dtype, name
        assert (caps.readable, caps.movable, caps.flyable) == (readable, movable, flyable), name
    assert reg.get_device("stage.coarse.x.setpoint").device_type.value == "signal"
    # The export is the file itself.
    assert reg.queueserver_yaml() == qs_file.read_text()
    await reg.close()
    # load ignores the file and runs the startup code (which now raises).
    reg = registry(sim_collection, mode="load")
    with pytest.raises(DiscoveryError, match="not run"):
        await reg.reload()
    await reg.close()
    # The file given directly.
    reg = registry(qs_file, mode="auto")
    assert (await reg.reload()).count == len(SIM_DEVICES)
    await reg.close()


async def test_yaml_mode_without_the_file_fails_clearly(sim_collection):
    reg = registry(sim_collection, mode="yaml")
    with pytest.raises(DiscoveryError, match=r"needs existing_plans_and_devices\.yaml"):
        await reg.reload()
    assert reg.status().state == DiscoveryState.FAILED


BROKEN = {
    "raises": ("00-devices.py", "from ophyd.sim import motor1\nraise ValueError('bad PV table')\n",
               "bad PV table"),
    "exits": ("00-devices.py", "import os\nos._exit(3)\n", "exited with code 3 without a result"),
    "syntax": ("00-devices.py", "motor1 = (\n", "SyntaxError"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_startup_is_reported_and_a_later_reload_replaces_it(tmp_path, case):
    file, text, expected = BROKEN[case]
    root = write_collection(tmp_path / "pc", {file: text})
    reg = registry(root)
    with pytest.raises(DiscoveryError) as info:
        await reg.reload()
    assert info.value.status_code == 422
    assert expected in info.value.message
    status = reg.status()
    assert status.state == DiscoveryState.FAILED and status.ready
    assert expected in status.last_error
    if case == "raises":
        assert "00-devices.py" in status.last_error
        assert "Traceback" in status.last_error_detail
    assert reg.list_devices().devices == []
    write_collection(root, {"00-devices.py": SIM_STARTUP})
    status = await reg.reload()
    assert status.state == DiscoveryState.LOADED and status.last_error is None
    assert status.count == len(SIM_DEVICES)
    await reg.close()


async def test_missing_path_then_it_appears(tmp_path):
    root = tmp_path / "not_yet"
    reg = registry(root)
    with pytest.raises(DiscoveryError, match="does not exist"):
        await reg.reload()
    assert reg.status().state == DiscoveryState.FAILED
    assert "does not exist" in reg.status().last_error
    write_collection(root, {"00-devices.py": SIM_STARTUP})
    assert (await reg.reload()).state == DiscoveryState.LOADED
    await reg.close()


async def test_failed_reload_keeps_the_last_good_list(sim_collection):
    reg = registry(sim_collection)
    first = await reg.reload()
    catalog = reg.catalog
    (sim_collection / "startup" / "50-broken.py").write_text("1 / 0\n")
    with pytest.raises(DiscoveryError) as info:
        await reg.reload()
    assert "ZeroDivisionError" in info.value.message
    assert "kept the last good list (6 devices" in info.value.message
    assert reg.catalog is catalog
    status = reg.status()
    assert status.state == DiscoveryState.LOADED
    assert status.loaded_at == first.loaded_at and status.count == len(SIM_DEVICES)
    assert "ZeroDivisionError" in status.last_error
    assert reg.get_device("stage.coarse.x").name == "stage.coarse.x"
    await reg.close()


async def test_concurrent_reloads_share_one_discovery(sim_collection):
    reg = registry(sim_collection)
    a, b = await asyncio.gather(reg.reload(), reg.reload())
    assert a.loaded_at == b.loaded_at
    await reg.close()


async def dies(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` is gone: SIGKILL is delivered asynchronously, so a process killed a
    moment ago may still be listed (more so on a loaded machine)."""
    deadline = time.monotonic() + within
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A killed grandchild stays a zombie until init reaps it: that is gone too.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    return True


#: Startup code that starts a grandchild process, writes both pids, and hangs.
HANG_WITH_GRANDCHILD = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "open({pids!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
    "time.sleep(600)\n"
)


async def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} was not written")


async def test_time_limit_kills_the_child_and_what_it_started(tmp_path):
    pids = tmp_path / "pids"
    root = write_collection(tmp_path / "pc", {
        "00-hang.py": HANG_WITH_GRANDCHILD.format(pids=str(pids))})
    reg = registry(root, timeout=4.0)
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match="time limit of 4 s"):
        await reg.reload()
    assert time.monotonic() - started < 20
    assert "killed" in reg.status().last_error
    for pid in map(int, pids.read_text().split()):
        assert await dies(pid), pid
    # Fixed, it loads (with a time limit a slow machine cannot miss).
    write_collection(root, {"00-devices.py": SIM_STARTUP})
    reg.config = DiscoveryConfig(path=str(root), mode=DiscoveryMode.LOAD, timeout=60.0)
    assert (await reg.reload()).count == len(SIM_DEVICES)
    await reg.close()


async def test_nothing_the_startup_code_started_outlives_discovery(tmp_path):
    pids = tmp_path / "pids"
    root = write_collection(tmp_path / "pc", {
        "00-server.py": "import subprocess, sys\n"
                        "child = subprocess.Popen([sys.executable, '-c', 'import time; "
                        "time.sleep(600)'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                        f"open({str(pids)!r}, 'w').write(str(child.pid))\n",
        "01-devices.py": SIM_STARTUP,
    })
    reg = registry(root)
    assert (await reg.reload()).count == len(SIM_DEVICES)
    assert await dies(int(pids.read_text()))
    await reg.close()


async def test_close_stops_a_running_discovery(tmp_path):
    pids = tmp_path / "pids"
    root = write_collection(tmp_path / "pc", {
        "00-hang.py": HANG_WITH_GRANDCHILD.format(pids=str(pids))})
    reg = registry(root)
    reg.start()
    text = await wait_for_file(pids)
    assert not reg.ready and reg.status().state == DiscoveryState.LOADING
    started = time.monotonic()
    await reg.close()
    assert time.monotonic() - started < 5
    for pid in map(int, text.split()):
        assert await dies(pid), pid


async def test_the_child_exits_when_the_service_dies(tmp_path):
    """The child runs in its own session; a service killed with SIGKILL must not leave a
    hanging discovery behind."""
    import signal
    import subprocess
    import sys

    pids = tmp_path / "pids"
    root = write_collection(tmp_path / "pc", {
        "00-hang.py": f"import os, time\nopen({str(pids)!r}, 'w').write(str(os.getpid()))\n"
                      "time.sleep(600)\n"})
    service = subprocess.Popen([sys.executable, "-c", (
        "import asyncio\n"
        "from bs_coordination.service.discovery import DeviceRegistry, DiscoveryConfig\n"
        f"asyncio.run(DeviceRegistry(DiscoveryConfig(path={str(root)!r})).reload())\n")])
    try:
        child = int(await wait_for_file(pids))
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait(10)
    deadline = time.monotonic() + 15
    while not gone(child) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert gone(child)


async def test_not_configured_accepts_everything():
    reg = registry(None)
    assert reg.ready and reg.status().state == DiscoveryState.DISABLED
    reg.check_lock_names(["anything.at.all"])
    with pytest.raises(DiscoveryError) as info:
        await reg.reload()
    assert info.value.status_code == 409
    with pytest.raises(UnknownDeviceError):
        reg.get_device("motor1")


async def test_strict_names(sim_collection):
    reg = registry(sim_collection, strict=True)
    with pytest.raises(DiscoveryError) as info:  # first discovery not done: retry later
        reg.check_lock_names(["motor1"])
    assert info.value.status_code == 503
    await reg.reload()
    reg.check_lock_names(["motor1", "stage.coarse.x", "det.val", "sx"])
    with pytest.raises(UnknownDeviceError) as info:
        reg.check_lock_names(["motor1", "motr1"])
    assert info.value.status_code == 404
    assert info.value.suggestions[0] == "motor1"
    assert "did you mean 'motor1'" in info.value.message
    with pytest.raises(UnknownDeviceError) as info:
        reg.check_lock_names(["stage.coarse.z"])
    assert set(info.value.suggestions) == {"stage.coarse.x", "stage.coarse.y"}
    await reg.close()


def test_worker_keeps_stdout_clean(tmp_path):
    """The child's standard output holds the JSON Lines result only, whatever startup prints."""
    import json
    import subprocess
    import sys

    root = write_collection(tmp_path / "pc", {"00-devices.py": SIM_STARTUP})
    proc = subprocess.run(
        [sys.executable, "-m", "bs_coordination.service._discovery_worker", "--startup-dir",
         str(root / "startup")], capture_output=True, timeout=60, check=True)
    head, *devices = [json.loads(line) for line in proc.stdout.splitlines()]
    assert head["ok"] and "must not confuse" in proc.stderr.decode()
    assert head["device_lines"] == len(devices)
    assert {d["name"] for d in devices} == set(SIM_DEVICES)
    result = head
    assert set(yaml.load(result["qs_yaml"], Loader=yaml.FullLoader)) == {
        "existing_plans", "existing_devices"}


async def test_a_missing_loader_names_the_extra_to_install(tmp_path, sim_collection):
    """A Python without bluesky-queueserver (the 'discovery' extra not installed): the status
    says which extra to install."""
    import subprocess
    import sys

    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=120)
    reg = DeviceRegistry(DiscoveryConfig(path=str(sim_collection), mode=DiscoveryMode.LOAD,
                                         python=str(bare / "bin" / "python")))
    with pytest.raises(DiscoveryError):
        await reg.reload()
    status = reg.status()
    assert status.state is DiscoveryState.FAILED
    assert "pip install 'bs-coordination[discovery]'" in (status.last_error or ""), status
    assert "bluesky_queueserver" in (status.last_error or "")
