"""``bs-coordination``: every subcommand against a live service, as a shell script sees it
(stdout, stderr, exit code)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bs_coordination import cli

SCRIPT = Path(sys.executable).parent / "bs-coordination"


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    """Run the command in this process; (exit code, stdout, stderr)."""
    code = cli.main(["--url", url, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def script(*argv: str, env: dict[str, str] | None = None) -> list[str]:
    """The installed console script (falls back to ``python -m`` outside a venv)."""
    base = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "bs_coordination.cli"]
    return [*base, *argv]


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_lock_prints_only_the_key_and_status_shows_the_holder(live_service, capsys):
    code, out, err = run(capsys, live_service.url, "lock", "m1", "m2", "--reason", "align optics",
                         "--user", "alice", "--timeout", "600")
    assert code == 0, err
    key = out.strip()
    assert key and "\n" not in key and " " not in key

    code, out, _ = run(capsys, live_service.url, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "TYPE", "HOLDER", "REASON", "SINCE", "UNTIL"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"m1", "m2"}
    for row in rows.values():
        assert "MANUAL_OPERATOR" in row and "alice" in row and "align optics" in row and "(in " in row
    assert key not in out

    code, out, _ = run(capsys, live_service.url, "status", "--json")
    body = json.loads(out)
    assert body["total_count"] == 2
    assert {lk["device_name"] for lk in body["locks"]} == {"m1", "m2"}
    assert key not in out


def test_conflict_exits_2_and_names_the_holder(live_service, capsys):
    code, _, _ = run(capsys, live_service.url, "lock", "m1", "--user", "alice", "--reason", "calibration")
    assert code == 0
    code, out, err = run(capsys, live_service.url, "lock", "m1", "--user", "bob")
    assert code == cli.EXIT_CONFLICT == 2
    assert out == ""
    assert "alice" in err and "MANUAL_OPERATOR" in err and "calibration" in err

    code, out, err = run(capsys, live_service.url, "--json", "lock", "m1", "--user", "bob")
    assert code == 2
    body = json.loads(out)
    assert body["success"] is False
    assert body["conflicts"][0]["user_id"] == "alice"
    assert "lock_key" not in json.dumps(body["conflicts"])


def test_preempted_lock_is_shown_under_its_preemptor(live_service, capsys):
    run(capsys, live_service.url, "lock", "m1", "--user", "alice", "--reason", "scan prep")
    code, _, err = run(capsys, live_service.url, "lock", "m1", "--type", "maintenance", "--user", "carl",
                       "--reason", "encoder fault", "--timeout", "none")
    assert code == 0, err
    code, out, _ = run(capsys, live_service.url, "status")
    lines = out.splitlines()[1:]
    assert len(lines) == 2
    assert lines[0].startswith("m1") and "MAINTENANCE" in lines[0] and "no expiry" in lines[0]
    assert lines[1].lstrip().startswith("└ m1") and "preempted" in lines[1] and "alice" in lines[1]

    code, out, _ = run(capsys, live_service.url, "status", "m1", "m9")
    assert code == 0
    assert "encoder fault" in out and "scan prep" in out and "m9: free" in out


def test_release_by_device_and_by_key(live_service, capsys):
    _, out, _ = run(capsys, live_service.url, "lock", "m1", "m2", "m3")
    key = out.strip()
    code, _, err = run(capsys, live_service.url, "release", "m1", "--key", "not-the-key")
    assert code == cli.EXIT_FORBIDDEN == 4, err
    assert "another key" in err

    code, out, _ = run(capsys, live_service.url, "release", "m1", "--key", key)
    assert code == 0 and out.strip() == "released m1"
    code, out, _ = run(capsys, live_service.url, "release", "--key", key)  # the rest of the key
    assert code == 0 and set(out.strip().removeprefix("released ").split(", ")) == {"m2", "m3"}
    assert get(live_service.url + "/api/locks/status")["total_count"] == 0

    code, _, err = run(capsys, live_service.url, "release", "--key", key)
    assert code == cli.EXIT_NOT_FOUND == 3
    assert "No lock" in err or "no lock" in err


def test_renew_extends_the_lease(live_service, capsys):
    _, out, _ = run(capsys, live_service.url, "lock", "m1", "--timeout", "60")
    key = out.strip()
    before = get(live_service.url + "/api/locks/device/m1")["lock"]["expires_at"]
    code, out, _ = run(capsys, live_service.url, "--json", "renew", "--key", key, "--timeout", "3600")
    assert code == 0
    after = json.loads(out)["expires_at"]
    assert after > before
    assert get(live_service.url + "/api/locks/device/m1")["lock"]["expires_at"] == after
    code, out, _ = run(capsys, live_service.url, "renew", "--key", key)
    assert code == 0 and out.startswith("renewed m1 until ")
    code, _, _ = run(capsys, live_service.url, "renew", "--key", "nothing-here")
    assert code == 3


def test_force_release_removes_every_lock_on_the_device(live_service, capsys):
    run(capsys, live_service.url, "lock", "m1", "--user", "alice")
    run(capsys, live_service.url, "lock", "m1", "--type", "MAINTENANCE", "--user", "carl")
    code, out, _ = run(capsys, live_service.url, "force-release", "m1", "--reason", "shift change")
    assert code == 0
    assert "carl" in out and "alice" in out
    assert get(live_service.url + "/api/locks/device/m1")["locked"] is False
    code, _, err = run(capsys, live_service.url, "force-release", "m1")
    assert code == cli.EXIT_NOT_FOUND and "m1" in err


def test_lock_wait_is_granted_when_the_holder_releases(live_service, capsys):
    _, out, _ = run(capsys, live_service.url, "lock", "m1", "--user", "alice")
    key = out.strip()
    waiter = subprocess.Popen(script("--url", live_service.url, "lock", "m1", "--user", "bob", "--wait", "30"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # While alice holds m1 the waiter must not come back (its request is held by the service).
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=1.0)
        run(capsys, live_service.url, "release", "--key", key)
        out, err = waiter.communicate(timeout=20)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, err
    assert out.strip()
    assert get(live_service.url + "/api/locks/device/m1")["lock"]["user_id"] == "bob"


def test_watch_prints_events_live(live_service, capsys):
    proc = subprocess.Popen(script("--url", live_service.url, "watch", "--count", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "no locks held"
        assert "watching" in proc.stdout.readline()
        _, out, _ = run(capsys, live_service.url, "lock", "det1", "--user", "alice", "--reason", "dark frames")
        run(capsys, live_service.url, "release", "--key", out.strip())
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = rest.splitlines()
    assert len(lines) == 2
    assert "acquired" in lines[0] and "det1" in lines[0] and "alice" in lines[0] and "dark frames" in lines[0]
    assert "released" in lines[1] and "det1" in lines[1]


def test_watch_json_prints_the_service_frames(live_service, capsys):
    proc = subprocess.Popen(script("--url", live_service.url, "watch", "--json", "--count", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        initial = json.loads(proc.stdout.readline())
        assert initial["type"] == "initial_status"
        _, out, _ = run(capsys, live_service.url, "lock", "m7")
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    event = json.loads(rest)
    assert event["type"] == "lock_update" and event["action"] == "acquired" and event["device_name"] == "m7"
    assert out.strip() not in rest  # the key never travels in an event


def test_devices_says_clearly_when_the_service_discovers_nothing(live_service, capsys):
    code, out, err = run(capsys, live_service.url, "devices")
    assert code in (cli.EXIT_OK, cli.EXIT_NOT_FOUND)
    assert "--profile-collection" in out + err


def test_url_and_user_come_from_the_environment(live_service, capsys, monkeypatch):
    monkeypatch.setenv("COORDINATION_URL", live_service.url)
    monkeypatch.setenv("COORDINATION_USER", "env-user")
    assert cli.main(["lock", "m1"]) == 0
    capsys.readouterr()
    assert cli.main(["status", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["locks"][0]["user_id"] == "env-user"


def test_a_key_starting_with_a_dash_is_a_key_not_an_option(live_service, capsys):
    # Lock keys are URL-safe base64: one in 64 starts with "-".
    code, _, err = run(capsys, live_service.url, "release", "--key", "-not-an-option")
    assert code == cli.EXIT_NOT_FOUND, err
    code, _, err = run(capsys, live_service.url, "renew", "--key", "-x", "--timeout", "30")
    assert code == cli.EXIT_NOT_FOUND, err


def test_unreachable_service_exits_1(capsys, unused_port):
    code, out, err = run(capsys, f"http://127.0.0.1:{unused_port}", "status")
    assert code == cli.EXIT_ERROR == 1
    assert out == "" and "cannot reach the coordination service" in err


def test_bad_arguments_exit_64(live_service, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--url", live_service.url, "lock", "m1", "--type", "SUPERUSER"])
    assert exc.value.code == cli.EXIT_USAGE
    assert "MANUAL_OPERATOR" in capsys.readouterr().err
    code, _, err = run(capsys, live_service.url, "lock", "bad name!")
    assert code == cli.EXIT_USAGE and "device name" in err


def test_help_documents_the_exit_codes():
    result = subprocess.run(script("--help"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for code in ("0", "1", "2", "3", "4", "64"):
        assert f"\n  {code} " in result.stdout
    assert "conflict" in result.stdout


def test_serve_runs_the_service(unused_port):
    port = unused_port
    env = {**os.environ, "COORDINATION_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(script("serve", "--host", "127.0.0.1", "--port", str(port)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert get(f"http://127.0.0.1:{port}/api/health/live")["status"] == "alive"
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "bs-coordination serve did not answer"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)



async def test_watch_resumes_after_a_lost_connection_without_missing_events(live_service, capsys):
    from tcpproxy import CuttableProxy

    proxy = CuttableProxy("127.0.0.1", int(live_service.url.rsplit(":", 1)[1]))
    await proxy.start()
    proc = await asyncio.create_subprocess_exec(
        *script("--url", f"http://127.0.0.1:{proxy.port}", "watch", "--count", "3"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"no locks held"
        assert b"watching" in await asyncio.wait_for(proc.stdout.readline(), 30)
        await asyncio.to_thread(run, capsys, live_service.url, "lock", "m1")
        assert b"acquired" in await asyncio.wait_for(proc.stdout.readline(), 30)

        proxy.cut()  # the events below happen while watch is disconnected
        await asyncio.to_thread(run, capsys, live_service.url, "lock", "m2")
        await asyncio.to_thread(run, capsys, live_service.url, "lock", "m3")
        proxy.restore()
        rest, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proxy.close()
    assert proc.returncode == 0, err
    lines = rest.decode().splitlines()
    assert [line.split()[2] for line in lines] == ["m2", "m3"]
    assert all("acquired" in line for line in lines)
    assert b"reconnecting" in err
