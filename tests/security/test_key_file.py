"""The ``--api-keys`` file: JSON or YAML, only hashes; a bad file stops the service at start
with one line that names the setting and the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from security_helpers import auth

from bs_coordination.apikeys import KeyRing, Role, hash_api_key, key_entry, new_api_key
from bs_coordination.service import create_app
from bs_coordination.service.config import Settings, SettingsError, parse_settings

GOOD = {"principal": "alice", "roles": ["operator"], "key_sha256": "ab" * 32}

BAD_FILES: dict[str, tuple[str, str, str]] = {
    # case -> (file name, content, words the one-line message must contain)
    "not JSON": ("keys.json", '{"api_keys": [', "not valid JSON"),
    "not YAML": ("keys.yaml", "api_keys: [\n  - {principal: alice", "not valid YAML"),
    "no api_keys list": ("keys.json", '{"keys": []}', '"api_keys"'),
    "a list at the top": ("keys.json", "[]", '"api_keys"'),
    "a key in clear text": ("keys.json", json.dumps({"api_keys": [{**GOOD, "key": "s3cret"}]}),
                            "clear text"),
    "short hash": ("keys.json", json.dumps({"api_keys": [{**GOOD, "key_sha256": "abc"}]}),
                   "key_sha256"),
    "unknown role": ("keys.json", json.dumps({"api_keys": [{**GOOD, "roles": ["root"]}]}),
                     "unknown role 'root'"),
    "no roles": ("keys.json", json.dumps({"api_keys": [{**GOOD, "roles": []}]}), "roles"),
    "bad principal": ("keys.json", json.dumps({"api_keys": [{**GOOD, "principal": "a\nb"}]}),
                      "principal"),
    "unknown field": ("keys.json", json.dumps({"api_keys": [{**GOOD, "rolez": ["read"]}]}),
                      "unknown field 'rolez'"),
    "duplicate key": ("keys.json", json.dumps({"api_keys": [GOOD, {**GOOD, "principal": "bob"}]}),
                      "entry 2"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_bad_file_stops_the_service_with_one_line(tmp_path: Path, capsys, case: str) -> None:
    name, content, words = BAD_FILES[case]
    path = tmp_path / name
    path.write_text(content)
    for argv, env, where in (([f"--api-keys={path}"], {}, "--api-keys"),
                             ([], {"COORDINATION_API_KEYS": str(path)}, "COORDINATION_API_KEYS")):
        with pytest.raises(SystemExit) as info:
            parse_settings(argv, env)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {where}: "), err
        assert words in err, err
        assert "s3cret" not in err
    # An app built from Settings directly (not from the command line) refuses it too.
    with pytest.raises(SettingsError, match=r"^--api-keys: "):
        create_app(Settings(api_keys=str(path)))


def test_a_missing_file_is_named(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--api-keys", str(tmp_path / "nope.json")], {})
    assert capsys.readouterr().err.startswith("error: --api-keys: no such file")


def test_the_service_command_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"api_keys": [{**GOOD, "roles": ["superuser"]}]}))
    done = subprocess.run([sys.executable, "-m", "bs_coordination.service", "--port", "1",
                           "--api-keys", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --api-keys: ") and "superuser" in done.stderr


def test_a_yaml_file_with_several_roles_works(service_factory, tmp_path: Path) -> None:
    key = new_api_key()
    path = tmp_path / "keys.yml"
    path.write_text("# keys of beamline staff\n" + yaml.safe_dump(
        {"api_keys": [{"principal": "carol", "roles": ["operator", "queue"],
                       "key_sha256": hash_api_key(key).upper()}]}))
    svc = service_factory("memory", api_keys=str(path))
    with httpx.Client(base_url=svc.url, headers=auth(key)) as c:
        for lock_type in ("MANUAL_OPERATOR", "QUEUE_EXECUTING"):
            r = c.post("/api/lock/request", json={"device_name": f"m.{lock_type}", "user_id": "x",
                                                  "lock_type": lock_type, "timeout": 30})
            assert r.status_code == 200 and r.json()["locks"][0]["user_id"] == "carol", r.text
        r = c.post("/api/lock/request", json={"device_name": "m9", "user_id": "x",
                                              "lock_type": "MAINTENANCE"})
        assert r.status_code == 403


def test_an_empty_list_lets_only_the_probes_through(service_factory, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"api_keys": []}')
    svc = service_factory("memory", api_keys=str(path))
    assert httpx.get(svc.url + "/api/health/live").status_code == 200
    assert httpx.get(svc.url + "/api/locks/status").status_code == 401


def test_the_ring_finds_keys_by_hash_only() -> None:
    alice, bob = new_api_key(), new_api_key()
    ring = KeyRing([key_entry("alice", ["operator"], alice), key_entry("bob", ["admin"], bob)])
    assert ring.find(alice).name == "alice"  # type: ignore[union-attr]
    found = ring.find(bob)
    assert found is not None and found.is_admin and found.can(Role.QUEUE) and found.can(Role.READ)
    assert ring.find(alice + "x") is None and ring.find("") is None
    assert ring.find(hash_api_key(alice)) is None  # the stored hash is not a key
    assert ring.find("k" * 100_000) is None
    assert len(new_api_key()) >= 43 and new_api_key() != new_api_key()
