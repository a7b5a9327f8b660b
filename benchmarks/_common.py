"""Helpers shared by the benchmarks: start real processes, drive load, summarise latencies."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Return once something accepts connections on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@contextmanager
def private_redis(appendfsync: str = "everysec") -> Iterator[str]:
    """A private ``redis-server`` (append-only, ``appendfsync``) on a free loopback port, in a
    temporary directory; yields its URL and stops it afterwards."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as d:
        port = free_port()
        redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
             "--appendonly", "yes", "--appendfsync", appendfsync,
             "--logfile", str(Path(d) / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            redis.terminate()
            redis.wait(10)


def wait_for_http(url: str, timeout: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextmanager
def process(args: list[str], ready_url: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def service(store: str = "memory") -> Iterator[str]:
    """A real coordination service (one uvicorn worker) on a free loopback port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([sys.executable, "-m", "bs_coordination.service", "--host", "127.0.0.1",
                  "--port", str(port), "--store", store, "--log-level", "WARNING"],
                 f"{url}/api/health/live"):
        yield url


#: How the throughput benchmarks run a server, the service and its anchor alike: one uvicorn
#: worker, its defaults (uvloop, httptools), warnings only, no access log.
UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"]


@contextmanager
def service_under_uvicorn(store: str = "memory") -> Iterator[subprocess.Popen[bytes]]:
    """The service as ``uvicorn --factory bs_coordination.service:create_app``, under the
    same uvicorn settings as ``trivial_app`` (``.url`` is set on the process)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([sys.executable, *UVICORN, "--port", str(port), "--factory",
                  "bs_coordination.service:create_app"], f"{url}/api/health/live",
                 env={"COORDINATION_STORE": store}) as proc:
        proc.url = url  # type: ignore[attr-defined]
        yield proc


@contextmanager
def trivial_app() -> Iterator[str]:
    """The anchor: a trivial FastAPI JSON endpoint under the same uvicorn settings."""
    with trivial_process() as proc:
        yield proc.url  # type: ignore[attr-defined]


@contextmanager
def trivial_process() -> Iterator[subprocess.Popen[bytes]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([sys.executable, *UVICORN, "--port", str(port), "--app-dir", HERE,
                  "_trivial_app:app"], f"{url}/ping") as proc:
        proc.url = url  # type: ignore[attr-defined]
        yield proc


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_clients(clients: int, seconds: float, pair: Callable[[int], Awaitable[object]]
                      ) -> tuple[float, list[float]]:
    """Run ``pair(i)`` in a loop on ``clients`` tasks: 1 s warm-up, then ``seconds`` measured."""
    latencies: list[float] = []
    measuring = False
    stop = False

    async def loop(i: int) -> None:
        while not stop:
            t0 = time.perf_counter()
            await pair(i)
            if measuring:
                latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(loop(i)) for i in range(clients)]
    await asyncio.sleep(1.0)
    measuring = True
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - start
    stop = True
    await asyncio.gather(*tasks)
    return len(latencies) / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def row(what: str, figure: str, anchor: str, ratio: float, target: str) -> str:
    return f"| {what} | {figure} | {anchor} | {ratio:.2f}x | {target} |"


HEADER = "| what | figure | anchor (same run) | ratio | target |\n|---|---|---|---|---|"

__all__ = ["HEADER", "cpu_seconds", "free_port", "percentile", "private_redis", "process", "row", "service",
           "service_under_uvicorn", "statistics", "trivial_app", "trivial_process", "wait_port"]
