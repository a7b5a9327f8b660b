"""Configuration: flags and environment variables, ``--help``, bad values, and the ways to start
the service (``python -m``, the console script, the script in ``service/``, the class, and
``uvicorn --factory``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bs_coordination.service.config import Settings, parse_settings

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
FLAGS_AND_VARS = [
    ("--host", "COORDINATION_HOST"), ("--port", "COORDINATION_PORT"),
    ("--store", "COORDINATION_STORE"), ("--profile-collection", "COORDINATION_PROFILE_COLLECTION"),
    ("--strict-devices", "COORDINATION_STRICT_DEVICES"), ("--api-keys", "COORDINATION_API_KEYS"),
    ("--log-level", "COORDINATION_LOG_LEVEL"), ("--cors-origins", "COORDINATION_CORS_ORIGINS"),
]


def test_defaults() -> None:
    s = parse_settings([], {})
    assert s == Settings()
    assert (s.host, s.port, s.store, s.log_level) == ("0.0.0.0", 60620, "memory", "INFO")
    assert s.profile_collection is None and s.api_keys is None and s.cors_origins == []
    assert s.strict_devices is False


def test_flags_environment_and_precedence(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"api_keys": []}')
    env = {"COORDINATION_PORT": "7000", "COORDINATION_LOG_LEVEL": "debug",
           "COORDINATION_REDIS_URL": "redis://h:1/0", "COORDINATION_API_KEYS": str(keys),
           "COORDINATION_PROFILE_COLLECTION": str(tmp_path), "COORDINATION_STRICT_DEVICES": "yes",
           "COORDINATION_CORS_ORIGINS": "http://a, http://b"}
    s = parse_settings([], env)
    assert s.port == 7000 and s.log_level == "DEBUG" and s.store == "redis://h:1/0"
    assert s.api_keys == str(keys) and s.profile_collection == str(tmp_path)
    assert s.strict_devices is True and s.cors_origins == ["http://a", "http://b"]
    # COORDINATION_STORE beats COORDINATION_REDIS_URL; a flag beats both.
    assert parse_settings([], {**env, "COORDINATION_STORE": "memory"}).store == "memory"
    s = parse_settings(["--port", "8000", "--store", "redis://x:2/1", "--log-level", "WARNING",
                        "--host", "127.0.0.1"], env)
    assert (s.port, s.store, s.log_level, s.host) == (8000, "redis://x:2/1", "WARNING", "127.0.0.1")


BAD = [
    (["--port", "abc"], {}, "--port"),
    (["--port", "0"], {}, "--port"),
    (["--port", "70000"], {}, "--port"),
    ([], {"COORDINATION_PORT": "-1"}, "COORDINATION_PORT"),
    (["--log-level", "LOUD"], {}, "--log-level"),
    ([], {"COORDINATION_LOG_LEVEL": "verbose"}, "COORDINATION_LOG_LEVEL"),
    (["--store", "mysql://db"], {}, "--store"),
    ([], {"COORDINATION_REDIS_URL": "localhost:6379"}, "COORDINATION_REDIS_URL"),
    (["--api-keys", "/nonexistent/keys.yaml"], {}, "--api-keys"),
    (["--profile-collection", "/nonexistent/profile"], {}, "--profile-collection"),
    ([], {"COORDINATION_STRICT_DEVICES": "maybe"}, "COORDINATION_STRICT_DEVICES"),
    (["--ws-queue-size", "0"], {}, "--ws-queue-size"),
    (["--no-such-flag"], {}, "--no-such-flag"),
]


@pytest.mark.parametrize(("argv", "env", "named"), BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_value_exits_2_with_one_line_naming_it(argv, env, named, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, env)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_help_documents_every_flag_and_variable() -> None:
    for cmd in ([PY, "-m", "bs_coordination.service", "--help"],
                [PY, str(REPO / "service" / "run_coordination_service.py"), "--help"]):
        r = run(*cmd)
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())  # argparse wraps lines
        for flag, var in FLAGS_AND_VARS:
            assert flag in text and var in text, (flag, var)
        assert "COORDINATION_REDIS_URL" in text and "60620" in text


def test_bad_flag_stops_the_service_with_one_line() -> None:
    r = run(PY, "-m", "bs_coordination.service", "--port", "abc")
    assert r.returncode == 2
    assert r.stderr == "error: --port: must be 1..65535, got 'abc'\n"
    r = run(PY, "-m", "bs_coordination.service", env={"COORDINATION_LOG_LEVEL": "LOUD"})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "COORDINATION_LOG_LEVEL" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def started(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Run ``cmd`` until it serves on ``port``; yields a list that receives its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env={**os.environ, **(env or {})})
    output: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{cmd} did not start"
            time.sleep(0.1)
        yield output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        output.append(out)


def test_python_m_serves_and_never_logs_a_lock_key() -> None:
    port = _free_port()
    with started([PY, "-m", "bs_coordination.service", "--host", "127.0.0.1", "--port",
                  str(port), "--log-level", "DEBUG"], port) as output:
        base = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{base}/api/lock/request", json={
            "device_name": "det1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"})
        assert r.status_code == 200
        key = r.json()["lock_key"]
        # The deprecated form puts the key in the query string: it must not reach the log.
        r = httpx.post(f"{base}/api/lock/release",
                       params={"device_name": "det1", "lock_key": key, "user_id": "alice"})
        assert r.status_code == 200
        r = httpx.post(f"{base}/api/lock/release", params={"device_name": "det1", "lock_key": key})
        assert r.status_code == 404
        assert httpx.get(f"{base}/api/health/ready").json()["store"] == "memory"
    log = output[0]
    assert "/api/lock/release" in log  # the access log is on...
    assert key not in log and "lock_key=" not in log  # ...without query strings


def test_console_script_class_and_factory_start_the_service() -> None:
    script = Path(PY).parent / "bs-coordination-service"
    port = _free_port()
    if script.exists():
        with started([str(script), "--host", "127.0.0.1", "--port", str(port)], port):
            pass
    port = _free_port()
    code = ("from bs_coordination import DeviceCoordinationService\n"
            f"DeviceCoordinationService(host='127.0.0.1', port={port}).run()\n")
    with started([PY, "-c", code], port):
        pass
    port = _free_port()
    with started([PY, "-m", "uvicorn", "--factory", "bs_coordination.service:create_app",
                  "--host", "127.0.0.1", "--port", str(port)], port,
                 env={"COORDINATION_LOG_LEVEL": "WARNING"}):
        r = httpx.get(f"http://127.0.0.1:{port}/api/health/ready")
        assert r.status_code == 200 and r.json()["store"] == "memory"
