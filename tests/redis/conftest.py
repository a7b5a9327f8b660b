"""Process-level fixtures: the service as a real OS process on a private Redis.

``spawn_service(redis_url)`` runs ``python -m bs_coordination.service --store redis://...``
on a free loopback port and waits until it answers; every process still running is killed
after the test. ``ServiceProcess.kill9()`` is a crash (SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

#: How long a service process may take to start answering.
START_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def wait_live(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/api/health/live", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"service on port {self.port} did not start:\n"
                           f"{self.log.read_text()[-3000:]}")


SpawnService = Callable[[str], ServiceProcess]


@pytest.fixture
def spawn_service(tmp_path: Path) -> Iterator[SpawnService]:
    """``spawn_service(store_url) -> ServiceProcess`` (started and answering)."""
    started: list[ServiceProcess] = []

    def spawn(store_url: str) -> ServiceProcess:
        port = _free_port()
        log = tmp_path / f"service-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bs_coordination.service", "--host", "127.0.0.1",
                 "--port", str(port), "--store", store_url, "--log-level", "WARNING"],
                stdout=out, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("COORDINATION_")},
            )
        svc = ServiceProcess(proc, port, log)
        started.append(svc)
        svc.wait_live()
        return svc

    yield spawn
    for svc in started:
        svc.stop()
