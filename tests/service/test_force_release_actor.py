"""Who force-released a lock, and why, is in its events (``actor``, ``reason``): ``/api/events``,
the WebSocket, ``bs-coordination watch``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from bs_coordination import cli
from bs_coordination.apikeys import key_entry, new_api_key

SCRIPT = Path(sys.executable).parent / "bs-coordination"
LOCK = {"device_name": "m1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"}


def script(*argv: str) -> list[str]:
    base = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "bs_coordination.cli"]
    return [*base, *argv]


def force_released(events: list[dict]) -> list[dict]:
    return [e for e in events if e["action"] == "force_released"]


async def test_the_force_release_names_its_actor_in_the_events(api) -> None:
    await api.grant("m1", "MANUAL_OPERATOR", "alice")
    r = await api.client.post("/api/lock/force-release",
                              json={"device_name": "m1", "reason": "stuck", "user_id": "carl"})
    assert r.status_code == 200, r.text
    (event,) = force_released(await api.events())
    assert event["actor"] == "carl" and event["lock"]["user_id"] == "alice"
    assert event["reason"] == "stuck"


async def test_the_force_release_reason_reaches_websocket_clients(api, ws) -> None:
    await api.grant("m1", "MANUAL_OPERATOR", "alice", reason="alignment")
    async with ws() as conn:
        r = await api.client.post("/api/lock/force-release", json={
            "device_name": "m1", "reason": "shift change", "user_id": "carl"})
        assert r.status_code == 200, r.text
        event = await conn.update("force_released", "m1")
    assert event["reason"] == "shift change" and event["actor"] == "carl"
    assert event["lock"]["reason"] == "alignment"  # the holder's own reason, unchanged


def test_with_api_keys_the_actor_is_the_principal(service_factory, tmp_path: Path) -> None:
    root, alice = new_api_key(), new_api_key()
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps({"api_keys": [key_entry("root", ["admin"], root),
                                                key_entry("alice", ["operator"], alice)]}))
    service = service_factory(api_keys=str(keyfile))
    with httpx.Client(base_url=service.url, timeout=30) as http:
        assert http.post("/api/lock/request", json=LOCK,
                         headers={"Authorization": f"ApiKey {alice}"}).status_code == 200
        r = http.post("/api/lock/force-release", json={"device_name": "m1", "user_id": "mallory"},
                      headers={"Authorization": f"ApiKey {root}"})
        assert r.status_code == 200, r.text
        events = http.get("/api/events", headers={"Authorization": f"ApiKey {root}"}).json()
    (event,) = force_released(events["events"])
    assert event["actor"] == "root"


def test_watch_says_who_force_released(live_service, capsys) -> None:
    assert cli.main(["--url", live_service.url, "lock", "m1", "--user", "alice"]) == 0
    proc = subprocess.Popen(script("--url", live_service.url, "watch", "--count", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        table = [proc.stdout.readline() for _ in range(3)]  # header, m1, then "watching"
        assert "alice" in table[1] and "watching" in table[2], table
        assert cli.main(["--url", live_service.url, "force-release", "m1", "--user", "carl",
                         "--reason", "shift change"]) == 0
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    (line,) = rest.splitlines()
    assert "force_released" in line and "alice" in line and "by carl" in line
    assert "reason: shift change" in line
