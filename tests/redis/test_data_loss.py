"""A Redis that lost its data (``FLUSHALL``, a restart without persistence) is noticed:
fencing tokens never go back, the loss is logged, counted and told to every WebSocket client,
on the replica that meets it first and on an idle one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect

pytestmark = [pytest.mark.redis]

#: How long a test waits for something that should happen promptly.
PROMPTLY = 15.0


async def grant(http: httpx.AsyncClient, device: str) -> int:
    r = await http.post("/api/lock/request", json={
        "device_name": device, "lock_type": "MANUAL_OPERATOR", "user_id": "alice"})
    assert r.status_code == 200, r.text
    return int(r.json()["token"])


@contextlib.asynccontextmanager
async def ws_messages(url: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Every message a WebSocket client receives after its initial status."""
    received: list[dict[str, Any]] = []
    async with connect(url) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), PROMPTLY))
        assert first["type"] == "initial_status"

        async def pump() -> None:
            with contextlib.suppress(Exception):
                async for text in ws:
                    received.append(json.loads(text))

        task = asyncio.create_task(pump())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(check, timeout: float = PROMPTLY) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def losses(metrics_text: str) -> float:
    found = re.search(r"^bs_coordination_store_data_losses_total (\S+)$", metrics_text, re.M)
    assert found, metrics_text
    return float(found.group(1))


async def test_flushall_is_noticed_and_tokens_never_go_back(redis_server, service_factory,
                                                            caplog) -> None:
    busy = service_factory(redis_server.url)
    idle = service_factory(redis_server.url)  # a replica that makes no change itself
    caplog.set_level(logging.ERROR)
    async with httpx.AsyncClient(base_url=busy.url, timeout=10) as http, \
            httpx.AsyncClient(base_url=idle.url, timeout=10) as idle_http, \
            ws_messages(busy.ws_url) as busy_ws, ws_messages(idle.ws_url) as idle_ws:
        issued = [await grant(http, f"m{i}") for i in range(5)]
        assert issued == sorted(issued)
        assert losses((await http.get("/metrics")).text) == 0

        redis.Redis(port=redis_server.port).flushall()

        # The idle replica notices by itself (its sweeper checks the data's generation).
        await until(lambda: any(m["type"] == "store_data_lost" for m in idle_ws))
        # The lock table is gone: m0 is free again, and its new token is above every one.
        after = await grant(http, "m0")
        assert after > max(issued), (after, issued)
        assert await grant(http, "m9") > after
        await until(lambda: any(m["type"] == "store_data_lost" for m in busy_ws))
        notice = next(m for m in busy_ws if m["type"] == "store_data_lost")
        assert "lost its data" in notice["message"] and "lock" in notice["message"]
        assert "redis://" not in notice["message"]  # no URL (it may hold a password)
        assert losses((await http.get("/metrics")).text) == 1
        assert losses((await idle_http.get("/metrics")).text) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("lock store lost its data" in e for e in errors), errors


async def test_a_restart_without_persistence_keeps_tokens_rising(redis_server, service_factory
                                                                  ) -> None:
    svc = service_factory(redis_server.url)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        before = [await grant(http, f"d{i}") for i in range(3)]
        redis_server.kill()
        for leftover in redis_server.dir.iterdir():  # what persistence would have kept
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.name != "redis.log":
                leftover.unlink()
        redis_server.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROMPTLY
        while True:  # 503 while Redis is away, then it heals by itself
            r = await http.post("/api/lock/request", json={
                "device_name": "d0", "lock_type": "MANUAL_OPERATOR", "user_id": "bob"})
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            assert loop.time() < deadline, r.text
            await asyncio.sleep(0.05)
        assert r.json()["token"] > max(before)
        assert losses((await http.get("/metrics")).text) == 1
