"""Shared fixtures that start real parts: a private redis-server on a free port.

``BS_COORDINATION_REQUIRE_REDIS=1`` (set by ``.ci/run``) turns a missing ``redis-server`` into a
test failure instead of a skip, so CI never passes without running the Redis tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_REDIS = os.environ.get("BS_COORDINATION_REQUIRE_REDIS") == "1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


class RedisServer:
    """A private ``redis-server`` with append-only persistence in its own directory.

    ``kill()`` sends SIGKILL; ``start()`` again brings it back on the same port and directory,
    with whatever its append-only file kept.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh private redis-server for one test (never the shared one on 6379)."""
    binary = redis_binary()
    if binary is None:
        if REQUIRE_REDIS:
            pytest.fail("redis-server is not installed, and CI requires the Redis tests to run")
        pytest.skip("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="bs-coord-redis-") as d:
        server = RedisServer(binary, Path(d))
        server.start()
        try:
            yield server
        finally:
            server.stop()
