"""The command line as built on the client library: a URL without a scheme, ``watch --count 0``,
and error texts that are the client's own."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from test_cli_commands import run, script

from bs_coordination import cli
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import ServiceError


def test_a_url_without_a_scheme_means_http(live_service, capsys, monkeypatch):
    hostport = live_service.url.removeprefix("http://")
    code, out, err = run(capsys, hostport, "lock", "m1", "--user", "alice")
    assert code == 0, err
    code, out, err = run(capsys, hostport, "status")
    assert code == 0, err
    assert "alice" in out
    monkeypatch.setenv("COORDINATION_URL", hostport)
    assert cli.main(["status", "m1"]) == 0
    assert "alice" in capsys.readouterr().out


def test_watch_count_0_prints_the_current_locks_and_exits(live_service, capsys):
    code, _, err = run(capsys, live_service.url, "lock", "det1", "--user", "alice", "--reason", "dark frames")
    assert code == 0, err
    done = subprocess.run(script("--url", live_service.url, "watch", "--count", "0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "TYPE", "HOLDER", "REASON", "SINCE", "UNTIL"]
    assert len(lines) == 2 and "det1" in lines[1] and "alice" in lines[1] and "dark frames" in lines[1]

    done = subprocess.run(script("--url", live_service.url, "--json", "watch", "--count", "0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and '"initial_status"' in done.stdout


def test_watch_count_must_not_be_negative(live_service, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--url", live_service.url, "watch", "--count", "-1"])
    assert info.value.code == cli.EXIT_USAGE
    assert "--count" in capsys.readouterr().err


def test_errors_say_what_the_client_library_says(capsys, unused_port):
    url = f"http://127.0.0.1:{unused_port}"

    async def client_says() -> None:
        client = DeviceCoordinationClient(url, timeout=5)
        try:
            await client.get_all_locks()
        finally:
            await client.disconnect()

    with pytest.raises(ServiceError) as info:
        asyncio.run(client_says())
    code, out, err = run(capsys, url, "status")
    assert code == cli.EXIT_ERROR and out == ""
    assert "cannot reach the coordination service" in info.value.message
    assert err == f"bs-coordination: {info.value.message}\n"


def test_renew_sets_the_lease_from_now_also_when_that_is_sooner(live_service, capsys):
    code, out, err = run(capsys, live_service.url, "lock", "m1", "--timeout", "900")
    assert code == 0, err
    key = out.strip()
    code, out, err = run(capsys, live_service.url, "--json", "status", "m1")
    before = json.loads(out)["lock"]["expires_at"]
    code, out, err = run(capsys, live_service.url, "--json", "renew", "--key", key, "--timeout", "600")
    assert code == 0, err
    after = json.loads(out)["expires_at"]
    assert after < before  # 600 s from now is sooner than the 900 s lease's end
    help_text = subprocess.run(script("renew", "--help"), capture_output=True, text=True, timeout=60).stdout
    assert "from now" in help_text and "shortens" in help_text


def test_a_lease_under_the_minimum_is_a_usage_error(live_service, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--url", live_service.url, "lock", "m1", "--timeout", "0.01"])
    assert info.value.code == cli.EXIT_USAGE
    assert "at least 0.1 s" in capsys.readouterr().err
