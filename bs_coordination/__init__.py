"""bs-coordination: device coordination for Bluesky beamlines.

Import everything from here::

    from bs_coordination import DeviceCoordinationClient, LockType

The service (``DeviceCoordinationService``) and the RunEngine plugin (``install``) are loaded on
first use, so a RunEngine process never imports FastAPI and the service never imports bluesky.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bs_coordination.errors import (
    CoordinationError,
    InvalidRequestError,
    LockConflictError,
    LockNotFoundError,
    LockNotOwnedError,
    ServiceError,
    StoreUnavailableError,
)
from bs_coordination.models import (
    DeviceLock,
    LockAction,
    LockPriority,
    LockRequest,
    LockResponse,
    LocksStatusResponse,
    LockState,
    LockStatus,
    LockType,
    LockUpdateMessage,
)

if TYPE_CHECKING:
    from bs_coordination.client import DeviceCoordinationClient, DeviceCoordinationContext
    from bs_coordination.runengine.plugin import install
    from bs_coordination.service import DeviceCoordinationService, create_app

_LAZY = {
    "DeviceCoordinationClient": "bs_coordination.client",
    "DeviceCoordinationContext": "bs_coordination.client",
    "DeviceCoordinationService": "bs_coordination.service",
    "create_app": "bs_coordination.service",
    "install": "bs_coordination.runengine.plugin",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bs_coordination' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CoordinationError",
    "DeviceCoordinationClient",
    "DeviceCoordinationContext",
    "DeviceCoordinationService",
    "DeviceLock",
    "InvalidRequestError",
    "LockAction",
    "LockConflictError",
    "LockNotFoundError",
    "LockNotOwnedError",
    "LockPriority",
    "LockRequest",
    "LockResponse",
    "LockState",
    "LockStatus",
    "LockType",
    "LockUpdateMessage",
    "LocksStatusResponse",
    "ServiceError",
    "StoreUnavailableError",
    "create_app",
    "install",
]
