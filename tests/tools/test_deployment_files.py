"""The deployment files under ``service/`` do what they say (no Docker engine or systemd here:
their command lines run as they would)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"
UNIT_VENV_BIN = "/opt/bs-coordination/venv/bin/"


def unit_entries(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a systemd unit, by key (a key may repeat)."""
    entries: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile as systemd reads it: VAR=value lines, comments and blanks skipped."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip().strip('"')
    return env


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_systemd_unit_starts_the_service_and_stops_cleanly(unused_port):
    unit = unit_entries(SERVICE_DIR / "bs-coordination.service")
    (exec_start,) = unit["ExecStart"]
    (env_path,) = unit["EnvironmentFile"]
    assert env_path.lstrip("-") == "/etc/bs-coordination/coordination.env"
    assert unit["User"] == ["bs-coordination"] and unit["KillSignal"] == ["SIGTERM"]

    # The unit's command line with this environment's venv in place of /opt/...; its
    # environment is the example file (what the README says to install), on a test port.
    argv = shlex.split(exec_start)
    assert argv[0].startswith(UNIT_VENV_BIN)
    argv[0] = str(Path(sys.executable).parent / argv[0][len(UNIT_VENV_BIN):])
    env = {"PATH": os.environ.get("PATH", ""), **env_file(SERVICE_DIR / "coordination.env.example")}
    assert env["COORDINATION_STORE"] == "memory"
    env.update(COORDINATION_HOST="127.0.0.1", COORDINATION_PORT=str(unused_port))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not answers(f"http://127.0.0.1:{unused_port}/api/health/live"):
            assert proc.poll() is None, f"the service exited: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the service did not answer /api/health/live"
            time.sleep(0.05)
        assert answers(f"http://127.0.0.1:{unused_port}/api/health/ready")
        proc.send_signal(signal.SIGTERM)  # what systemctl stop sends
        stop_timeout = float(unit["TimeoutStopSec"][0])
        # uvicorn shuts down gracefully, then re-raises the signal: systemd counts an exit by
        # SIGTERM as a clean stop (like 0), so either is fine; hanging or crashing is not.
        assert proc.wait(stop_timeout) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def dockerfile_healthcheck() -> str:
    text = (SERVICE_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(.*)$", text, re.MULTILINE)
    assert match, "the Dockerfile has no HEALTHCHECK"
    return match.group(1).strip()


def test_dockerfile_health_check_probes_readiness(live_service, unused_port):
    text = (SERVICE_DIR / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    command = dockerfile_healthcheck()
    assert "/api/health/ready" in command
    # Run the health check's shell command as Docker would (sh -c), against a live service
    # and against a port where nothing listens.
    python_dir = str(Path(sys.executable).parent)
    port = live_service.url.rsplit(":", 1)[1]
    base_env = {"PATH": f"{python_dir}:{os.environ.get('PATH', '')}"}
    ok = subprocess.run(["sh", "-c", command], env={**base_env, "COORDINATION_PORT": port},
                        capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(["sh", "-c", command], env={**base_env, "COORDINATION_PORT": str(unused_port)},
                          capture_output=True, timeout=30)
    assert down.returncode != 0


def test_compose_runs_the_service_on_redis_with_append_only_persistence():
    compose = yaml.safe_load((SERVICE_DIR / "compose.yaml").read_text())
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    service = compose["services"]["coordination"]
    assert service["environment"]["COORDINATION_STORE"].startswith("redis://redis:")
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["build"]["dockerfile"] == "service/Dockerfile"
    assert (SERVICE_DIR / service["build"]["context"] / "pyproject.toml").exists()
    assert "ports" not in redis  # Redis stays inside the compose network


def test_example_environment_names_only_settings_the_service_reads():
    from bs_coordination.service.config import build_parser, settings_from

    text = (SERVICE_DIR / "coordination.env.example").read_text()
    documented = set(re.findall(r"^#?(COORDINATION_[A-Z_]+)=", text, re.MULTILINE))
    help_text = " ".join(action.help or "" for action in build_parser()._actions)
    for name in documented:
        assert name in help_text, f"{name} is not a setting of the service"
    settings = settings_from([], env_file(SERVICE_DIR / "coordination.env.example"))
    assert settings.port == 60620 and settings.store == "memory" and settings.log_level == "INFO"
