"""Raw HTTP (httpx) and raw WebSocket (websockets) helpers for the service tests.

Every test here talks to a real uvicorn server; ``api`` and ``ws`` run against the ``service``
fixture, which is parametrized over the stores (``store_url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

#: How long a test waits for an event it expects (generous: CI machines are slow).
EVENT_WAIT = 5.0


class Api:
    """Thin raw-HTTP helper; remembers every lock key it was given (to look for leaks)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.keys: set[str] = set()

    async def lock(self, device: str | list[str], lock_type: str = "MANUAL_OPERATOR",
                   user: str = "alice", **fields: Any) -> httpx.Response:
        body: dict[str, Any] = {"lock_type": lock_type, "user_id": user, **fields}
        if isinstance(device, list):
            body["device_names"] = device
        else:
            body["device_name"] = device
        r = await self.client.post("/api/lock/request", json=body)
        if r.status_code == 200:
            self.keys.add(r.json()["lock_key"])
        return r

    async def grant(self, device: str | list[str], lock_type: str = "MANUAL_OPERATOR",
                    user: str = "alice", **fields: Any) -> dict[str, Any]:
        """Lock and insist on success; returns the body."""
        r = await self.lock(device, lock_type, user, **fields)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["success"] is True
        return body

    async def release(self, key: str, device: str | None = None,
                      user: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"lock_key": key}
        if device is not None:
            body["device_name"] = device
        if user is not None:
            body["user_id"] = user
        return await self.client.post("/api/lock/release", json=body)

    async def status(self) -> dict[str, Any]:
        r = await self.client.get("/api/locks/status")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def device(self, name: str) -> dict[str, Any]:
        r = await self.client.get(f"/api/locks/device/{name}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def events(self, since: str | None = None) -> list[dict[str, Any]]:
        params = {"since": since} if since is not None else {}
        r = await self.client.get("/api/events", params=params)
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events

    async def held(self) -> dict[str, list[tuple[str, str, str]]]:
        """device -> [(user, type, state)] of every lock: a compact picture of the table."""
        out: dict[str, list[tuple[str, str, str]]] = {}
        for lk in (await self.status())["locks"]:
            out.setdefault(lk["device_name"], []).append(
                (lk["user_id"], lk["lock_type"], lk["state"]))
        return out


class WsClient:
    """A raw WebSocket connection that keeps every frame it received."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.frames: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._seen = 0

    async def recv(self, timeout: float = EVENT_WAIT) -> dict[str, Any]:
        text = await asyncio.wait_for(self.conn.recv(), timeout)
        assert isinstance(text, str)
        self.raw.append(text)
        frame: dict[str, Any] = json.loads(text)
        self.frames.append(frame)
        return frame

    async def send(self, msg: Any) -> None:
        await self.conn.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def expect(self, pred: Callable[[dict[str, Any]], bool],
                     timeout: float = EVENT_WAIT) -> dict[str, Any]:
        """Next frame (after the ones already matched) that satisfies ``pred``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while self._seen < len(self.frames):
                frame = self.frames[self._seen]
                self._seen += 1
                if pred(frame):
                    return frame
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout} s; got {self.frames}")
            await self.recv(remaining)

    async def update(self, action: str, device: str, timeout: float = EVENT_WAIT) -> dict[str, Any]:
        return await self.expect(
            lambda f: f.get("type") == "lock_update" and f["action"] == action
            and f["device_name"] == device, timeout)

    async def updates(self, n: int, timeout: float = EVENT_WAIT) -> list[dict[str, Any]]:
        """The next ``n`` lock_update frames."""
        return [await self.expect(lambda f: f.get("type") == "lock_update", timeout)
                for _ in range(n)]


@pytest.fixture
async def http(service: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        yield client


@pytest.fixture
def api(http: httpx.AsyncClient) -> Api:
    return Api(http)


WsFactory = Callable[..., contextlib.AbstractAsyncContextManager[WsClient]]


@pytest.fixture
def ws(service: Any) -> WsFactory:
    """``async with ws(since=None) as c:``: a raw WebSocket to the service (initial_status is
    read already and is ``c.frames[0]``)."""

    @contextlib.asynccontextmanager
    async def open_ws(since: str | None = None, *, read_initial: bool = True,
                      url: str | None = None, **kw: Any) -> AsyncIterator[WsClient]:
        target = url or service.ws_url
        if since is not None:
            target += f"?since={since}"
        async with connect(target, **kw) as conn:
            client = WsClient(conn)
            if read_initial:
                first = await client.recv()
                assert first["type"] == "initial_status", first
                client._seen = 1
            yield client

    return open_ws
