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


@pytest.mark.parametrize("module", ["plans", "suspender", "plugin"])
def test_the_runengine_modules_keep_their_documented_paths(module):
    """``bs_coordination.plans`` (``coordinated_wrapper``, ``coordinated_decorator``),
    ``.suspender`` and ``.plugin``, as the design names them, are the RunEngine package's."""
    import importlib

    old = importlib.import_module(f"bs_coordination.{module}")
    new = importlib.import_module(f"bs_coordination.runengine.{module}")
    assert old.__all__ == new.__all__
    assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)


def test_the_plan_wrapper_is_importable_where_the_design_puts_it():
    from bs_coordination.plans import coordinated_decorator, coordinated_wrapper
    from bs_coordination.plugin import install
    from bs_coordination.suspender import LockPreemptedSuspender

    assert callable(coordinated_wrapper) and callable(coordinated_decorator)
    assert install is bs_coordination.install
    assert LockPreemptedSuspender.__module__ == "bs_coordination.runengine.suspender"


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("statement", [
    "from bs_coordination import DeviceCoordinationClient, DeviceCoordinationContext",
    "from bs_coordination import install",
    "import bs_coordination.runengine.plans, bs_coordination.runengine.suspender",
    "import bs_coordination.plans, bs_coordination.suspender, bs_coordination.plugin",
])
def test_runengine_side_never_imports_the_service(statement):
    loaded = _modules_loaded_by(statement)
    assert not {"fastapi", "uvicorn", "starlette", "bs_coordination.service"} & loaded


def test_service_never_imports_the_runengine():
    loaded = _modules_loaded_by("from bs_coordination.service import create_app; create_app()")
    assert not {"bluesky.run_engine", "bs_coordination.runengine.plans", "bs_coordination.runengine.plugin"} & loaded


def test_every_store_is_importable_from_the_stores_package():
    from bs_coordination.stores import EtcdStore, MemoryStore, RedisStore
    from bs_coordination.stores.etcd import EtcdStore as etcd_store
    from bs_coordination.stores.redis import RedisStore as redis_store

    assert (RedisStore, EtcdStore) == (redis_store, etcd_store)
    assert MemoryStore.__module__ == "bs_coordination.stores.memory"


def test_the_stores_package_loads_no_networked_store_until_one_is_used():
    loaded = _modules_loaded_by("import bs_coordination.stores")
    assert not {"redis", "bs_coordination.stores.redis", "bs_coordination.stores.etcd"} & loaded
