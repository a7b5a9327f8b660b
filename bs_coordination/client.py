"""The client library: ``DeviceCoordinationClient`` and ``DeviceCoordinationContext``.

::

    from bs_coordination import DeviceCoordinationClient, DeviceCoordinationContext, LockType

    async with DeviceCoordinationClient("http://localhost:60620") as client:
        async with DeviceCoordinationContext(client, "det1", LockType.MANUAL_OPERATOR,
                                             "alice", reason="alignment") as lock_key:
            ...  # det1 is held here; released on exit, error or cancellation

The implementation lives in ``bs_coordination._client``; this module is its public face. It
imports aiohttp and pydantic only (never FastAPI or the service), so a RunEngine process or an
operator tool stays light.
"""

from __future__ import annotations

from bs_coordination._client._client import DeviceCoordinationClient, default_ws_url
from bs_coordination._client._context import DeviceCoordinationContext
from bs_coordination._client._lease import LeaseKeeper
from bs_coordination._client._monitor import LockCallback, MessageCallback, StatusCallback

__all__ = [
    "DeviceCoordinationClient",
    "DeviceCoordinationContext",
    "LeaseKeeper",
    "LockCallback",
    "MessageCallback",
    "StatusCallback",
    "default_ws_url",
]
