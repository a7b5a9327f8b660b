"""The public API is chosen: pin it, and pin the import direction between its two sides."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bs_coordination

EXPECTED = {
    "CoordinationError", "DeviceCoordinationClient", "DeviceCoordinationContext",
    "DeviceCoordinationService", "DeviceLock", "InvalidRequestError", "LockAction",
    "LockConflictError", "LockNotFoundError", "LockNotOwnedError", "LockPriority", "LockRequest",
    "LockResponse", "LockState", "LockStatus", "LockType", "LockUpdateMessage",
    "LocksStatusResponse", "ServiceError", "StoreUnavailableError", "create_app", "install",
}


def test_all_is_pinned():
    assert set(bs_coordination.__all__) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_exported_name_resolves(name):
    assert getattr(bs_coordination, name) is not None


def test_original_names_keep_their_meaning():
    from bs_coordination import LockPriority, LockType

    assert [t.value for t in LockType] == ["MAINTENANCE", "QUEUE_EXECUTING", "MANUAL_OPERATOR", "QUEUE_QUEUED"]
    assert [LockPriority[t.value] for t in LockType] == [0, 1, 2, 3]


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("statement", [
    "from bs_coordination import DeviceCoordinationClient, DeviceCoordinationContext",
    "from bs_coordination import install",
    "import bs_coordination.runengine.plans, bs_coordination.runengine.suspender",
])
def test_runengine_side_never_imports_the_service(statement):
    loaded = _modules_loaded_by(statement)
    assert not {"fastapi", "uvicorn", "starlette", "bs_coordination.service"} & loaded


def test_service_never_imports_the_runengine():
    loaded = _modules_loaded_by("from bs_coordination.service import create_app; create_app()")
    assert not {"bluesky.run_engine", "bs_coordination.runengine.plans", "bs_coordination.runengine.plugin"} & loaded
