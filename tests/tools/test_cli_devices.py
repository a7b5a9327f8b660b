"""``bs-coordination devices`` against a service that discovers a profile collection."""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_cli_commands import get, run


def test_devices_lists_the_profile_collection(service_factory, capsys):
    collection = Path(__file__).resolve().parents[2] / "profile_collection_example" / "startup"
    service = service_factory(profile_collection=str(collection))
    deadline = time.monotonic() + 60
    while True:  # discovery runs in a child process after start
        status = get(service.url + "/api/device-config/status")
        if status["ready"]:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    code, out, err = run(capsys, service.url, "devices")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "CLASS", "MODULE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert {"det", "det1", "det2", "motor", "motor1", "motor2", "stage"} <= set(rows)
    assert rows["motor1"][1:3] == ["motor", "SynAxis"]

    code, out, _ = run(capsys, service.url, "devices", "--device-type", "motor", "--json")
    assert code == 0
    assert {d["device_type"] for d in json.loads(out)["devices"]} == {"motor"}
