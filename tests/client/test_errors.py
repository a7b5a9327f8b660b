"""How the client reads answers the bs-coordination service does not give: the original
service's 200-with-``success: false``, a store outage, a proxy's error page, a WebSocket that
never sends its initial status. A small real aiohttp server plays those services."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import pytest
from aiohttp import web

from bs_coordination import (
    DeviceCoordinationClient,
    DeviceCoordinationContext,
    LockConflictError,
    LockType,
    ServiceError,
    StoreUnavailableError,
)

HOLDER = {
    "device_name": "detector1", "lock_type": "MAINTENANCE", "priority": 0, "user_id": "carol",
    "reason": "bake-out", "acquired_at": datetime.now(timezone.utc).isoformat(), "token": 7,
}


async def lock_request(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    who = body["user_id"]
    if who == "original":  # the original service: 200, success false, no holder records
        return web.json_response({"success": False, "message": "Device detector1 is locked",
                                  "lock_key": None})
    if who == "original-holder":
        return web.json_response({"success": False, "message": "Device detector1 is locked",
                                  "conflicts": [HOLDER]})
    if who == "store-down":
        return web.json_response({"success": False, "message": "store unavailable: redis down"},
                                 status=503)
    if who == "proxy":
        return web.Response(status=502, text="<html>Bad Gateway</html>",
                            content_type="text/html")
    return web.Response(status=500, text="Internal Server Error")


async def ready(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "not ready", "reason": "store down"}, status=503)


async def silent_ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    if request.query.get("close") == "1":
        await ws.close()
        return ws
    async for _ in ws:  # never says anything
        pass
    return ws


@pytest.fixture
async def odd_service() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/api/lock/request", lock_request)
    app.router.add_get("/api/health/ready", ready)
    app.router.add_get("/ws", silent_ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_service_that_answers_but_is_not_ready_still_connects(odd_service: str) -> None:
    async with DeviceCoordinationClient(odd_service) as client:
        health = await client.health_check()
        assert health["ready"] is False and health["reason"] == "store down"


async def test_original_service_refusal_is_a_failed_response(odd_service: str) -> None:
    async with DeviceCoordinationClient(odd_service) as client:
        response = await client.request_lock("detector1", LockType.MANUAL_OPERATOR, "original")
        assert response.success is False and response.message == "Device detector1 is locked"
        assert response.conflicts == []
        with pytest.raises(LockConflictError) as info:
            async with DeviceCoordinationContext(client, "detector1", LockType.MANUAL_OPERATOR,
                                                 "original-holder"):
                pytest.fail("the body must not run")  # pragma: no cover
        assert "'carol' (MAINTENANCE)" in info.value.message
        assert "bake-out" in info.value.message
        assert info.value.holder is not None and info.value.holder.token == 7


async def test_error_statuses_map_to_errors(odd_service: str) -> None:
    async with DeviceCoordinationClient(odd_service) as client:
        with pytest.raises(StoreUnavailableError) as down:
            await client.request_lock("d", LockType.MANUAL_OPERATOR, "store-down")
        assert down.value.message == "store unavailable: redis down"
        with pytest.raises(ServiceError) as proxy:
            await client.request_lock("d", LockType.MANUAL_OPERATOR, "proxy")
        assert proxy.value.status_code == 502 and "Bad Gateway" in proxy.value.message
        with pytest.raises(ServiceError) as boom:
            await client.request_lock("d", LockType.MANUAL_OPERATOR, "boom")
        assert boom.value.status_code == 500 and "Internal Server Error" in boom.value.message


async def test_monitoring_without_initial_status_times_out_clearly(odd_service: str) -> None:
    async with DeviceCoordinationClient(odd_service) as client:
        with pytest.raises(ServiceError) as info:
            await client.start_websocket_monitoring(timeout=0.5)
        assert "no initial_status within 0.5 s" in info.value.message
        assert not client.monitoring


async def test_monitoring_closed_before_initial_status_fails_clearly(odd_service: str) -> None:
    async with DeviceCoordinationClient(odd_service,
                                        ws_url=odd_service.replace("http", "ws") + "/ws?close=1"
                                        ) as client:
        with pytest.raises(ServiceError) as info:
            await client.start_websocket_monitoring(timeout=5)
        assert "closed before its initial_status" in info.value.message
        assert not client.monitoring


async def test_monitoring_with_nothing_listening_fails_at_once() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A long timeout: the first failed connection must end it, not the timeout.
    client = DeviceCoordinationClient(f"http://127.0.0.1:{port}", timeout=60)
    try:
        with pytest.raises(ServiceError) as info:
            await client.start_websocket_monitoring()
        assert f"cannot open WebSocket ws://127.0.0.1:{port}/ws" in info.value.message
        assert not client.monitoring
    finally:
        await client.disconnect()


async def test_a_refused_websocket_handshake_keeps_its_status(odd_service: str) -> None:
    async with DeviceCoordinationClient(odd_service,
                                        ws_url=odd_service.replace("http", "ws") + "/nowhere"
                                        ) as client:
        with pytest.raises(ServiceError) as info:
            await client.start_websocket_monitoring(timeout=5)
        assert info.value.status_code == 404
        assert "cannot open WebSocket" in info.value.message
