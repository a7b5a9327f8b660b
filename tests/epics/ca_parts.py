"""Helpers of the EPICS tests (imported by the test modules; fixtures are in conftest.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll ``predicate`` until true; return the seconds it took; fail naming ``what``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(interval)
    return time.monotonic() - start
