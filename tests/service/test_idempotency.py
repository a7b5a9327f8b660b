"""``Idempotency-Key``: a lock request sent again after its answer was lost gets the same grant
(same lock_key, same token), never a conflict with itself or a second lock."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import httpx

from bs_coordination import DeviceCoordinationClient, LockType


def body(device: str = "m1", lock_type: str = "MANUAL_OPERATOR", **fields: Any) -> dict[str, Any]:
    return {"device_name": device, "lock_type": lock_type, "user_id": "alice", "timeout": 60,
            **fields}


async def test_the_same_request_sent_again_gets_the_same_grant(service) -> None:
    key = {"Idempotency-Key": secrets.token_urlsafe(24)}
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
        first = await http.post("/api/lock/request", json=body(), headers=key)
        again = await http.post("/api/lock/request", json=body(), headers=key)
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.json()["lock_key"] == first.json()["lock_key"]
        assert again.json()["token"] == first.json()["token"]
        status = (await http.get("/api/locks/status")).json()
        assert status["total_count"] == 1
        # Without the header, the same body is another request: a conflict.
        other = await http.post("/api/lock/request", json=body())
        assert other.status_code == 409
        # Released, the key is free again; a new Idempotency-Key makes a new grant.
        r = await http.post("/api/lock/release", json={"lock_key": first.json()["lock_key"]})
        assert r.status_code == 200
        new = await http.post("/api/lock/request", json=body(),
                              headers={"Idempotency-Key": secrets.token_urlsafe(24)})
        assert new.status_code == 200 and new.json()["token"] > first.json()["token"]


async def test_another_request_under_the_same_key_is_refused(service) -> None:
    key = {"Idempotency-Key": secrets.token_urlsafe(24)}
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
        assert (await http.post("/api/lock/request", json=body(), headers=key)).status_code == 200
        before = (await http.get("/api/locks/status")).json()["locks"]
        for changed in (body("m2"), body(lock_type="MAINTENANCE"), body(reason=None, timeout=60,
                                                                         plan_uid="p-2")):
            r = await http.post("/api/lock/request", json=changed, headers=key)
            assert r.status_code == 422, r.text
            assert "Idempotency-Key" in r.json()["message"]
        assert (await http.get("/api/locks/status")).json()["locks"] == before


async def test_a_malformed_idempotency_key_is_refused(service) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
        for bad in ("short", "x" * 256, "has space in it, sixteen+"):
            r = await http.post("/api/lock/request", json=body(),
                                headers={"Idempotency-Key": bad})
            assert r.status_code == 422, (bad, r.text)
            assert "Idempotency-Key" in r.text
        assert (await http.get("/api/locks/status")).json()["total_count"] == 0


class LosesFirstAnswer:
    """A loopback proxy that forwards everything but drops the answer to the first lock
    request (the connection closes after the request reached the service): a crash or a
    network cut between commit and answer."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.lost: bytes | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.update((writer, up_writer))
        asked: list[bool] = []  # per request on this connection: is it a lock request?

        async def upstream() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    if data.startswith((b"GET ", b"POST ")):
                        asked.append(data.startswith(b"POST /api/lock/request "))
                    up_writer.write(data)
                    await up_writer.drain()

        up = asyncio.create_task(upstream())
        try:
            while data := await up_reader.read(65536):
                if asked and asked[-1] and self.lost is None:
                    self.lost = data  # read from the service, never delivered
                    break
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            await asyncio.gather(up, return_exceptions=True)

    async def close(self) -> None:
        assert self._server is not None
        for w in self._writers:
            w.close()
        self._server.close()
        await self._server.wait_closed()


async def test_the_client_library_sends_a_request_again_after_a_lost_answer(live_service) -> None:
    proxy = LosesFirstAnswer(live_service.port)
    await proxy.start()
    try:
        async with DeviceCoordinationClient(f"http://127.0.0.1:{proxy.port}", timeout=5) as c:
            response = await c.request_lock("m1", LockType.MANUAL_OPERATOR, "alice", timeout=60)
        assert response.success, response.message
        assert proxy.lost is not None and b'"success":true' in proxy.lost  # committed, lost
        assert f'"token":{response.token}'.encode() in proxy.lost  # the same grant
    finally:
        await proxy.close()
    async with httpx.AsyncClient(base_url=live_service.url, timeout=10) as http:
        locks = (await http.get("/api/locks/status")).json()["locks"]
    assert [(lk["device_name"], lk["token"]) for lk in locks] == [("m1", response.token)]
