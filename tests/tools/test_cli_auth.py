"""The command line against a service with API keys: ``keys new`` makes keys the service
accepts, ``--api-key``/``COORDINATION_API_KEY`` carry them, refusals have their exit codes."""

from __future__ import annotations

import json
import subprocess

from test_cli_commands import run, script

from bs_coordination import cli
from bs_coordination.apikeys import key_entry


def new_key(capsys, principal: str, *roles: str) -> tuple[str, dict]:
    argv = ["--json", "keys", "new", "--principal", principal]
    for role in roles:
        argv += ["--role", role]
    assert cli.main(argv) == 0
    made = json.loads(capsys.readouterr().out)
    return made["api_key"], made["entry"]


def test_keys_made_by_the_cli_open_the_service(service_factory, capsys, tmp_path, monkeypatch):
    alice, alice_entry = new_key(capsys, "alice", "operator")
    root, root_entry = new_key(capsys, "root", "admin")
    assert alice not in json.dumps(alice_entry)  # the file keeps only the hash
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps({"api_keys": [alice_entry, root_entry]}))
    service = service_factory(api_keys=str(keyfile))

    code, out, err = run(capsys, service.url, "status")
    assert code == cli.EXIT_FORBIDDEN and out == ""
    assert err.startswith("bs-coordination: status: ") and "key" in err.lower()

    code, out, err = run(capsys, service.url, "--api-key", alice, "lock", "m1", "--reason", "align")
    assert code == 0, err
    key = out.strip()
    code, _, err = run(capsys, service.url, "--api-key", alice, "lock", "m2", "--type", "MAINTENANCE")
    assert code == cli.EXIT_FORBIDDEN, err  # an operator may not take maintenance locks

    monkeypatch.setenv("COORDINATION_API_KEY", root)
    code, out, _ = run(capsys, service.url, "--json", "status")
    assert code == 0
    (lock,) = json.loads(out)["locks"]
    assert lock["user_id"] == "alice"  # the key's principal, whatever --user said
    code, out, _ = run(capsys, service.url, "force-release", "m1")
    assert code == 0 and "alice" in out
    code, _, _ = run(capsys, service.url, "release", "--key", key)
    assert code == cli.EXIT_NOT_FOUND


def test_watch_sends_the_key_on_the_websocket(service_factory, capsys, tmp_path):
    viewer, viewer_entry = new_key(capsys, "viewer", "read")
    alice, alice_entry = new_key(capsys, "alice", "operator")
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps({"api_keys": [viewer_entry, alice_entry]}))
    service = service_factory(api_keys=str(keyfile))

    refused = subprocess.run(script("--url", service.url, "watch", "--count", "1"),
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == cli.EXIT_FORBIDDEN, refused.stderr
    assert "refused" in refused.stderr

    proc = subprocess.Popen(script("--url", service.url, "--api-key", viewer, "--json", "watch", "--count", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["type"] == "initial_status"
        code, _, err = run(capsys, service.url, "--api-key", alice, "lock", "det1")
        assert code == 0, err
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    event = json.loads(rest)
    assert (event["action"], event["device_name"], event["lock"]["user_id"]) == ("acquired", "det1", "alice")


def test_a_key_that_starts_with_a_dash_is_a_value_not_an_option(service_factory, capsys, tmp_path):
    """URL-safe base64 keys start with ``-`` one time in 64: ``--api-key -Xy...`` and
    ``--key -Xy...`` must still pass them as values."""
    key = "-" + new_key(capsys, "alice", "operator")[0]
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps({"api_keys": [key_entry("alice", ["operator"], key)]}))
    service = service_factory(api_keys=str(keyfile))

    code, out, err = run(capsys, service.url, "--api-key", key, "lock", "m1", "--reason", "align")
    assert code == 0, err
    lock_key = out.strip()
    code, out, err = run(capsys, service.url, "--api-key", key, "--json", "status")
    assert code == 0, err
    assert [lock["device_name"] for lock in json.loads(out)["locks"]] == ["m1"]
    assert cli.join_key_values(["release", "--key", "-Xy"]) == ["release", "--key=-Xy"]
    code, _, err = run(capsys, service.url, "--api-key", key, "release", "--key", lock_key)
    assert code == 0, err
