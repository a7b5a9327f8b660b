"""Helpers of the EPICS tests (imported by the test modules; fixtures are in conftest.py)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from typing import Any

import pytest

#: How long an IOC, the bridge or the service may take to start.
START_SECONDS = 30.0


class Proc:
    """A subprocess whose output is collected (shown when it fails to start)."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str) -> None:
        self.args, self.env, self.ready = args, env, ready
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self) -> Proc:
        self.lines = []
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(START_SECONDS):
            self.stop()
            raise RuntimeError(f"{self.args[1:3]} did not start:\n" + "".join(self.lines[-40:]))
        return self

    def _read(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            if self.ready in line:
                ready.set()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def output(self) -> str:
        return "".join(self.lines)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll ``predicate`` until true; return the seconds it took; fail naming ``what``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(interval)
    return time.monotonic() - start
