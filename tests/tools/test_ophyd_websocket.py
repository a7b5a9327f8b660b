"""The real ``ophyd-websocket`` server, wrapped by ``UnifiedOphydWebSocketServer``, with an
``ophyd.sim`` motor: sets go through when the device is free, are refused naming the holder
while the queue holds it, and the session's lock is gone once the WebSocket closes.

ophyd-websocket needs Python >= 3.12 and this suite may run on an older one, so the server runs
in a Python >= 3.12 virtual environment of its own (made once, kept in
``~/.cache/bs-coordination/``, or ``BS_COORDINATION_OPHYD_WS_VENV``), importing bs_coordination
from this checkout. Without a Python >= 3.12 the test is skipped, or fails when
``BS_COORDINATION_REQUIRE_OPHYD_WS=1``.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("BS_COORDINATION_REQUIRE_OPHYD_WS") == "1"
VENV = Path(os.environ.get("BS_COORDINATION_OPHYD_WS_VENV")
            or Path.home() / ".cache" / "bs-coordination" / "ophyd-ws-py312")
# The device socket subscribes Epics signals, Epics motors and pseudo positioners only (other
# devices fail its subscription), so the WebSocket test moves ophyd.sim's pseudo positioner;
# the REST test moves the plain simulated motor.
STARTUP = """\
import time

from ophyd.sim import SPseudo1x3, SynAxis

motor1 = SynAxis(name="motor1")
pseudo1 = SPseudo1x3(name="pseudo1")


class SlowPseudo(SPseudo1x3):
    \"\"\"A pseudo positioner whose set takes 0.5 s: a write in progress.\"\"\"

    def set(self, *args, **kwargs):
        time.sleep(0.5)
        return super().set(*args, **kwargs)


slow1 = SlowPseudo(name="slow1")
"""


def _works(python: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "True"


def find_python312() -> str | None:
    """A Python >= 3.12 interpreter: this one, one on PATH, or one pyenv installed."""
    if sys.version_info >= (3, 12):
        return sys.executable
    names = [shutil.which(n) for n in ("python3.12", "python3.13", "python3.14")]
    names += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.1[2-9]*/bin/python3")))
    names += ["/usr/bin/python3.12", "/usr/bin/python3.13"]
    return next((n for n in names if n and os.path.exists(n) and _works(n)), None)


def unavailable(message: str) -> None:
    if REQUIRED:
        pytest.fail(message + " (BS_COORDINATION_REQUIRE_OPHYD_WS=1 requires this test to run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def ophyd_ws_python() -> str:
    """The Python of a venv with ophyd-websocket installed (created on first use)."""
    python = VENV / "bin" / "python"
    probe = "import ophyd_websocket.server, aiohttp, yarl"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return str(python)
    base = find_python312()
    if base is None:
        unavailable("ophyd-websocket needs Python >= 3.12 and none was found")
    if not python.exists():
        subprocess.run([str(base), "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "ophyd-websocket", "aiohttp"],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        unavailable(f"could not install ophyd-websocket: {install.stderr[-1500:]}")
    return str(python)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def ophyd_ws_server(ophyd_ws_python, live_service, tmp_path, unused_port) -> Iterator[str]:
    """The gated ophyd-websocket server on a loopback port, with ``motor1`` loaded."""
    (tmp_path / "startup.py").write_text(STARTUP)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OAS_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [ophyd_ws_python, "-m", "bs_coordination.ophyd_ws", "--coordination-url", live_service.url,
         "--user-id", "ophyd_websocket", "--startup-dir", str(tmp_path), "--host", "127.0.0.1",
         "--port", str(unused_port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{unused_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = http("POST", url + "/api/v1/load-devices")
                break
            except OSError:
                assert proc.poll() is None, f"the server exited: {proc.communicate()[1][-3000:]}"
                assert time.monotonic() < deadline, "the ophyd-websocket server did not start"
                time.sleep(0.1)
        assert status == 200 and sorted(body["devices_loaded"]) == ["motor1", "pseudo1", "slow1"], body
        yield url
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def position(url: str, device: str = "motor1") -> float:
    """Where the server reads the device to be (its first reading: the motor, the pseudo axis)."""
    status, body = http("GET", f"{url}/api/v1/devices/{device}")
    assert status == 200, body
    key = {"motor1": "motor1", "pseudo1": "pseudo1_pseudo1", "slow1": "slow1_pseudo1"}[device]
    return float(body["values"][key]["value"])


def queue_lock(coordination: str, device: str = "motor1") -> str:
    status, body = http("POST", coordination + "/api/lock/request", {
        "device_name": device, "lock_type": "QUEUE_EXECUTING", "user_id": "queue_server",
        "reason": "plan count", "timeout": 300})
    assert status == 200, body
    return str(body["lock_key"])


async def reply(ws: aiohttp.ClientWebSocketResponse, *keys: str, timeout: float = 20.0) -> dict[str, Any]:
    """The next message carrying one of ``keys`` (value updates in between are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive_json(timeout=max(0.01, deadline - time.monotonic()))
        if any(k in msg for k in keys):
            return dict(msg)


async def test_websocket_set_is_gated_and_the_session_lock_ends_with_the_socket(ophyd_ws_server, live_service):
    coordination = live_service.url
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ophyd_ws_server.replace("http", "ws") + "/api/v1/device-socket") as ws:
            await ws.send_json({"action": "subscribe", "device": "pseudo1"})
            subscribed = await reply(ws, "subscribed")
            assert subscribed["subscribed"] == ["pseudo1"], subscribed
            await ws.send_json({"action": "set", "device": "pseudo1", "value": 1.5, "timeout": 5})
            done = await reply(ws, "message", "error")
            assert done.get("message") == "Successfully set pseudo1 to 1.5", done
            assert position(ophyd_ws_server, "pseudo1") == 1.5
            lock = http("GET", coordination + "/api/locks/device/pseudo1")[1]["lock"]
            assert (lock["user_id"], lock["lock_type"]) == ("ophyd_websocket", "MANUAL_OPERATOR")

            key = queue_lock(coordination, "pseudo1")  # the queue preempts the session's lock
            await ws.send_json({"action": "set", "device": "pseudo1", "value": 7.0, "timeout": 5})
            refused = await reply(ws, "error", "message")
            assert "error" in refused, refused
            assert "queue_server" in refused["error"] and "QUEUE_EXECUTING" in refused["error"]
            assert "plan count" in refused["error"]
            assert refused["holder"]["user_id"] == "queue_server"
            assert position(ophyd_ws_server, "pseudo1") == 1.5  # the refused set never reached it

            assert http("POST", coordination + "/api/lock/release", {"lock_key": key})[0] == 200
            await ws.send_json({"action": "set", "device": "pseudo1", "value": 2.0, "timeout": 5})
            done = await reply(ws, "message", "error")
            assert done.get("message") == "Successfully set pseudo1 to 2.0", done  # lock restored
            status = http("GET", coordination + "/api/locks/device/pseudo1")[1]
            assert status["lock"]["user_id"] == "ophyd_websocket"
        # The socket is closed: its lock must go (the server releases it as the session ends).
        deadline = time.monotonic() + 20
        while True:
            status = http("GET", coordination + "/api/locks/device/pseudo1")[1]
            if not status["locked"] and not status["preempted"]:
                break
            assert time.monotonic() < deadline, f"the session's lock is still there: {status}"
            await asyncio.sleep(0.05)
    assert position(ophyd_ws_server, "pseudo1") == 2.0


async def test_rest_set_is_refused_with_409_while_the_queue_holds_the_device(ophyd_ws_server, live_service):
    coordination = live_service.url
    key = queue_lock(coordination)
    status, body = http("PUT", ophyd_ws_server + "/api/v1/devices", {"device": "motor1", "set_value": 4.0})
    assert status == 409, body
    assert "queue_server" in body["error"] and body["holder"]["lock_type"] == "QUEUE_EXECUTING"
    assert position(ophyd_ws_server) == 0.0
    assert http("POST", coordination + "/api/lock/release", {"lock_key": key})[0] == 200

    status, body = http("PUT", ophyd_ws_server + "/api/v1/devices", {"device": "motor1", "set_value": 4.0})
    assert status == 200 and body["success"] is True, body
    deadline = time.monotonic() + 10
    while position(ophyd_ws_server) != 4.0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # The request's lock lasted as long as the request.
    assert http("GET", coordination + "/api/locks/device/motor1")[1]["locked"] is False


async def test_a_set_in_progress_finishes_before_maintenance_is_answered(ophyd_ws_server,
                                                                         live_service):
    """The preemption handshake: maintenance takes a device while a session's set of it is in
    progress; the answer comes after the set ended (acknowledged), and later sets are refused
    naming maintenance."""
    coordination = live_service.url
    ws_url = ophyd_ws_server.replace("http", "ws") + "/api/v1/device-socket"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        await ws.send_json({"action": "subscribe", "device": "slow1"})
        assert (await reply(ws, "subscribed"))["subscribed"] == ["slow1"]
        await ws.send_json({"action": "set", "device": "slow1", "value": 1.0, "timeout": 5})
        assert (await reply(ws, "message", "error")).get("message") == "Successfully set slow1 to 1.0"
        lock = http("GET", coordination + "/api/locks/device/slow1")[1]["lock"]
        assert lock["user_id"] == "ophyd_websocket" and lock["acknowledge_preemption"] is True

        await ws.send_json({"action": "set", "device": "slow1", "value": 2.0, "timeout": 5})
        sent = time.monotonic()
        await asyncio.sleep(0.1)  # the set (0.5 s) is in progress
        answer = await asyncio.to_thread(http, "POST", coordination + "/api/lock/request", {
            "device_name": "slow1", "lock_type": "MAINTENANCE", "user_id": "maint_bob",
            "reason": "encoder swap"})
        answered = time.monotonic()
        status, body = answer
        assert status == 200 and body["acknowledged"] is True, body
        assert body["preempted"][0]["user_id"] == "ophyd_websocket"
        assert body["preempted"][0]["preemption_ack"] == "acknowledged"
        assert answered - sent >= 0.45  # not before the 0.5 s set had ended
        assert position(ophyd_ws_server, "slow1") == 2.0  # the set in progress had ended
        assert (await reply(ws, "message", "error")).get("message") == "Successfully set slow1 to 2.0"

        await ws.send_json({"action": "set", "device": "slow1", "value": 3.0, "timeout": 5})
        refused = await reply(ws, "error", "message")
        assert "maint_bob" in refused.get("error", ""), refused
        assert refused["holder"]["lock_type"] == "MAINTENANCE"
        assert position(ophyd_ws_server, "slow1") == 2.0
        assert http("POST", coordination + "/api/lock/release", {"lock_key": body["lock_key"]})[0] == 200
