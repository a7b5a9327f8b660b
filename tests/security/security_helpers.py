"""Helpers shared by the security tests (importable by name: conftest modules are not)."""

from __future__ import annotations

from typing import Any

#: principal -> roles of the test keys.
ROLES: dict[str, list[str]] = {
    "reader": ["read"],
    "alice": ["operator"],
    "bob": ["operator"],
    "qs": ["queue"],
    "root": ["admin"],
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"ApiKey {key}"}


def lock_body(device: str | list[str], lock_type: str = "MANUAL_OPERATOR", user: str = "someone",
              **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"lock_type": lock_type, "user_id": user, **fields}
    if isinstance(device, list):
        body["device_names"] = device
    else:
        body["device_name"] = device
    return body
