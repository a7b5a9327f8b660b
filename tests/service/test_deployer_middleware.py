"""Every request, lock operations included, passes through the ASGI middleware a deployer adds
to the app (a request counter, Starlette's TrustedHostMiddleware), as FastAPI promises."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send


class Counter:
    """A deployer's pure ASGI middleware: counts the HTTP requests it sees, by path."""

    seen: list[tuple[str, str]]

    def __init__(self, app: ASGIApp, seen: list[tuple[str, str]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


async def test_lock_operations_pass_through_a_deployers_middleware(service_factory) -> None:
    seen: list[tuple[str, str]] = []

    def configure(app: Any) -> None:
        app.add_middleware(Counter, seen=seen)

    svc = service_factory("memory", configure=configure)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        r = await http.post("/api/lock/request", json={
            "device_name": "m1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"})
        assert r.status_code == 200, r.text
        key = r.json()["lock_key"]
        assert (await http.post("/api/lock/renew", json={"lock_key": key, "timeout": 60})
                ).status_code == 200
        assert (await http.post("/api/lock/release", json={"lock_key": key})).status_code == 200
        assert (await http.get("/api/locks/status")).status_code == 200
    assert seen == [("POST", "/api/lock/request"), ("POST", "/api/lock/renew"),
                    ("POST", "/api/lock/release"), ("GET", "/api/locks/status")]


async def test_trusted_host_refuses_lock_requests_for_other_hosts(service_factory) -> None:
    def configure(app: Any) -> None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["coordination.example"])

    svc = service_factory("memory", configure=configure)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        r = await http.post("/api/lock/request", json={
            "device_name": "m1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"})
        assert r.status_code == 400 and "Invalid host header" in r.text
        r = await http.post("/api/lock/request", headers={"host": "coordination.example"}, json={
            "device_name": "m1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"})
        assert r.status_code == 200, r.text
