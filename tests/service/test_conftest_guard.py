"""The autouse guard in ``tests/conftest.py`` fails a test that leaves asyncio tasks running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_a_leaked_task_fails_the_test() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(HERE / "leftover_task_example.py")],
        capture_output=True, text=True, timeout=120, cwd=HERE.parents[1])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "left 1 asyncio task(s) running: forgotten-sleeper" in r.stdout, r.stdout
