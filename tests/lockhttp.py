"""The lock service as another party sees it: plain HTTP with its own keys (shared by the
RunEngine and the queue-server tests)."""

from __future__ import annotations

from typing import Any

import httpx


class LockHttp:
    """A lock-service client that is not the one under test: it reads the table and takes
    and releases locks of its own."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url
        headers = {"Authorization": f"ApiKey {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, timeout=10, headers=headers)

    def locks(self) -> list[dict[str, Any]]:
        r = self.http.get("/api/locks/status")
        r.raise_for_status()
        return list(r.json()["locks"])

    def held(self, user_id: str) -> dict[str, dict[str, Any]]:
        """Locks of ``user_id`` by device name."""
        return {lk["device_name"]: lk for lk in self.locks() if lk["user_id"] == user_id}

    def events(self, since: str | None = None) -> list[dict[str, Any]]:
        r = self.http.get("/api/events", params={"since": since} if since else None)
        r.raise_for_status()
        return list(r.json()["events"])

    def last_event_id(self) -> str | None:
        events = self.events()
        return str(events[-1]["event_id"]) if events else None

    def lock(self, device: str, lock_type: str, user_id: str, reason: str | None = None,
             timeout: float | None = None) -> str:
        r = self.http.post("/api/lock/request", json={
            "device_name": device, "lock_type": lock_type, "user_id": user_id,
            "reason": reason, "timeout": timeout})
        assert r.status_code == 200, r.text
        return str(r.json()["lock_key"])

    def release(self, lock_key: str) -> None:
        r = self.http.post("/api/lock/release", json={"lock_key": lock_key})
        assert r.status_code == 200, r.text

    def close(self) -> None:
        self.http.close()
