"""The autouse guard in ``tests/conftest.py`` fails a test that leaves asyncio tasks running."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bs_coordination.stores.memory import MemoryStore

HERE = Path(__file__).resolve().parent


def test_a_leaked_task_fails_the_test() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(HERE / "leftover_task_example.py")],
        capture_output=True, text=True, timeout=120, cwd=HERE.parents[1])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "left 1 asyncio task(s) running: forgotten-sleeper" in r.stdout, r.stdout


class _StoreThatWarnsAtStart(MemoryStore):
    """A store whose start fails the way redis-py 8.2's warning did under ``filterwarnings =
    error``: the lifespan raises, and uvicorn ends with only ``SystemExit(3)``."""

    async def start(self) -> None:
        warnings.warn("a warning raised while the store started, on purpose", UserWarning,
                      stacklevel=1)


def test_a_service_that_does_not_start_names_the_cause(service_factory) -> None:
    with pytest.raises(RuntimeError) as info:
        service_factory("memory", store=_StoreThatWarnsAtStart())
    text = str(info.value)
    assert "the test service did not start" in text
    assert "a warning raised while the store started, on purpose" in text, text
