"""``bs-coordination preflight ITEM_JSON``: the console script against a live service with the
example collection; what an operator reads and the exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from lockhttp import LockHttp
from preflight_collection import EXAMPLE

CLI = str(Path(sys.executable).with_name("bs-coordination"))
PARK = json.dumps({"name": "park_and_count", "args": [["det1"]], "kwargs": {"num": 2}})


def run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "--url", url, "preflight", *args], capture_output=True,
                          text=True, timeout=120)


def test_preflight_prints_devices_and_who_is_in_the_way(service_factory: Any) -> None:
    svc = service_factory(profile_collection=str(EXAMPLE))
    locks = LockHttp(svc.url)
    try:
        done = run(svc.url, PARK)
        assert done.returncode == 0, done.stderr
        assert "park_and_count" in done.stdout and "can start" in done.stdout
        assert "det1 (argument)" in done.stdout and "motor2 (dry run)" in done.stdout

        key = locks.lock("motor2", "MAINTENANCE", "bob", reason="bake-out of the axis",
                         timeout=600)
        done = run(svc.url, PARK)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "BLOCKED" in done.stdout
        row = next(line for line in done.stdout.splitlines() if "bake-out" in line)
        assert row.split()[:3] == ["motor2", "MAINTENANCE", "bob"]
        assert "(in 9m" in row or "(in 10m" in row  # until when, with the time left

        done = run(svc.url, "--json", PARK)
        assert done.returncode == 2
        answer = json.loads(done.stdout)
        assert answer["can_start"] is False
        assert answer["conflicts"][0]["lock"]["user_id"] == "bob"

        locks.release(key)
        assert run(svc.url, PARK).returncode == 0
    finally:
        locks.close()


def test_preflight_refusals_and_their_exit_codes(service_factory: Any) -> None:
    svc = service_factory(profile_collection=str(EXAMPLE))
    done = run(svc.url, "{not json")
    assert done.returncode == 64 and "not JSON" in done.stderr
    done = run(svc.url, json.dumps({"name": "park_and_cont", "args": [["det1"]]}))
    assert done.returncode == 64 and "park_and_cont" in done.stderr
    assert "park_and_count" in done.stderr  # the close name
    done = run(svc.url)
    assert done.returncode == 64 and "ITEM_JSON or --queue" in done.stderr

    bare = service_factory()
    done = run(bare.url, PARK)
    assert done.returncode == 1 and "--profile-collection" in done.stderr
