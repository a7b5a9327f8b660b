"""The acceptance list of the Redis store, with the service as real processes: a crash of a
service, two replicas under contention, a Redis crash and its return."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: How long a test waits for something that should happen promptly.
PROMPTLY = 15.0


async def lock(client: httpx.AsyncClient, base: str, device: str, user: str,
               lock_type: str = "MANUAL_OPERATOR", **fields: Any) -> httpx.Response:
    return await client.post(f"{base}/api/lock/request", json={
        "device_name": device, "lock_type": lock_type, "user_id": user, **fields})


async def until(check, timeout: float = PROMPTLY) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def ws_events(url: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Connect a WebSocket client; yields the list its ``lock_update`` messages go to."""
    received: list[dict[str, Any]] = []
    async with connect(url) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), PROMPTLY))
        assert first["type"] == "initial_status"

        async def pump(conn: ClientConnection) -> None:
            async for text in conn:
                msg = json.loads(text)
                if msg.get("type") == "lock_update":
                    received.append(msg)

        task = asyncio.create_task(pump(ws))
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_lock_survives_kill_9_of_its_service(redis_server, spawn_service) -> None:
    a = spawn_service(redis_server.url)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await lock(client, a.url, "det1", "alice", reason="overnight scan")
        assert r.status_code == 200
        key = r.json()["lock_key"]
        a.kill9()

        b = spawn_service(redis_server.url)
        status = (await client.get(f"{b.url}/api/locks/device/det1")).json()
        assert status["locked"] is True and status["lock"]["user_id"] == "alice"
        assert status["lock"]["reason"] == "overnight scan" and key not in json.dumps(status)
        assert (await lock(client, b.url, "det1", "bob")).status_code == 409
        r = await client.post(f"{b.url}/api/lock/release",
                              json={"lock_key": key, "device_name": "det1"})
        assert r.status_code == 200
        assert (await client.get(f"{b.url}/api/locks/status")).json()["total_count"] == 0


async def test_two_replicas_eight_clients_each_device_granted_once(
        redis_server, spawn_service) -> None:
    a, b = spawn_service(redis_server.url), spawn_service(redis_server.url)
    devices = [f"motor{i}" for i in range(5)]

    async def client_run(n: int, client: httpx.AsyncClient) -> list[tuple[str, str, int]]:
        base = (a, b)[n % 2].url
        wins = []
        order = devices[:]
        random.Random(n).shuffle(order)
        for d in order:
            r = await lock(client, base, d, f"client{n}")
            assert r.status_code in (200, 409), r.text
            if r.status_code == 200:
                wins.append((d, base, r.json()["token"]))
        return wins

    async with ws_events(b.ws_url) as seen_by_b, httpx.AsyncClient(timeout=10) as client:
        results = await asyncio.gather(*(client_run(n, client) for n in range(8)))
        wins = [w for r in results for w in r]
        assert sorted(d for d, _, _ in wins) == devices  # every device exactly once
        assert len({t for _, _, t in wins}) == len(devices)

        sa = (await client.get(f"{a.url}/api/locks/status")).json()
        sb = (await client.get(f"{b.url}/api/locks/status")).json()
        holders_a = {x["device_name"]: (x["user_id"], x["token"]) for x in sa["locks"]}
        holders_b = {x["device_name"]: (x["user_id"], x["token"]) for x in sb["locks"]}
        assert holders_a == holders_b and sorted(holders_a) == devices

        # Whichever replica won the race, a lock taken through A reaches B's WebSocket.
        via_a = await lock(client, a.url, "shutter", "client-a")
        assert via_a.status_code == 200
        expected = {*devices, "shutter"}

        async def b_saw_all() -> bool:
            got = {m["device_name"] for m in seen_by_b if m["action"] == "acquired"}
            return got == expected

        await until(b_saw_all)
        ids = [m["event_id"] for m in seen_by_b]
        assert len(ids) == len(set(ids)) == len(expected)
        shutter = next(m for m in seen_by_b if m["device_name"] == "shutter")
        assert shutter["lock"]["user_id"] == "client-a"
        assert shutter["lock"]["token"] == via_a.json()["token"]


async def test_redis_outage_fails_closed_and_heals(redis_server, spawn_service) -> None:
    svc = spawn_service(redis_server.url)
    async with httpx.AsyncClient(timeout=10) as client:
        kept = await lock(client, svc.url, "det1", "alice", timeout=None)
        assert kept.status_code == 200
        short = await lock(client, svc.url, "det2", "queue", "QUEUE_EXECUTING", timeout=1.0)
        assert short.status_code == 200
        assert (await client.get(f"{svc.url}/api/health/ready")).status_code == 200

        redis_server.kill()
        r = await lock(client, svc.url, "det3", "bob")
        assert r.status_code == 503 and "unavailable" in r.json()["message"]
        assert (await client.post(f"{svc.url}/api/lock/release", json={
            "lock_key": kept.json()["lock_key"]})).status_code == 503
        ready = await client.get(f"{svc.url}/api/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        assert (await client.get(f"{svc.url}/api/health/live")).status_code == 200
        await asyncio.sleep(1.2)  # det2's lease runs out while Redis is down

        redis_server.start()  # same port, same directory, no service restart

        async def ready_again() -> bool:
            return (await client.get(f"{svc.url}/api/health/ready")).status_code == 200

        await until(ready_again)
        status = (await client.get(f"{svc.url}/api/locks/status")).json()
        assert [x["device_name"] for x in status["locks"]] == ["det1"]
        assert (await lock(client, svc.url, "det3", "bob")).status_code == 200
        assert (await lock(client, svc.url, "det1", "bob")).status_code == 409

        async def expiry_announced() -> bool:
            events = (await client.get(f"{svc.url}/api/events")).json()["events"]
            return [e["device_name"] for e in events if e["action"] == "expired"] == ["det2"]

        await until(expiry_announced)
        assert (await client.post(f"{svc.url}/api/lock/release", json={
            "lock_key": kept.json()["lock_key"]})).status_code == 200


async def test_a_redis_crash_under_load_loses_no_granted_lock(redis_server, spawn_service) -> None:
    """Requests in flight when Redis dies answer 200, 409 or 503 (never 500, never hang), and
    every lock answered 200 is still held when Redis is back: no grant without storage."""
    svc = spawn_service(redis_server.url)
    granted: list[str] = []
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client_loop(n: int, client: httpx.AsyncClient) -> None:
        i = 0
        while not stop.is_set():
            device = f"c{n}-{i}"
            i += 1
            r = await lock(client, svc.url, device, f"client{n}")
            statuses.append(r.status_code)
            if r.status_code == 200:
                granted.append(device)
            elif r.status_code == 503:
                await asyncio.sleep(0.02)

    async with httpx.AsyncClient(timeout=10) as client:
        tasks = [asyncio.create_task(client_loop(n, client)) for n in range(8)]
        try:
            await until(lambda: _at_least(granted, 20))
            redis_server.kill()
            before_outage = len(statuses)
            await until(lambda: _at_least(statuses, before_outage + 20))
            redis_server.start()
            after_restart = len(granted)
            await until(lambda: _at_least(granted, after_restart + 20))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert set(statuses) <= {200, 503} and 503 in statuses
        held = {x["device_name"] for x in
                (await client.get(f"{svc.url}/api/locks/status")).json()["locks"]}
        assert set(granted) <= held


async def _at_least(items: list, n: int) -> bool:  # type: ignore[type-arg]
    return len(items) >= n


async def test_the_service_starts_on_redis_without_a_warning(redis_server, spawn_service) -> None:
    """Operators read the start-up log: on a Redis store it holds no warning (redis-py 8.2
    warned about a synchronous Retry given to its asyncio client at every start)."""
    svc = spawn_service(redis_server.url)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        assert (await http.get("/api/health/ready")).status_code == 200
        r = await http.post("/api/lock/request", json={
            "device_name": "m1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"})
        assert r.status_code == 200, r.text
    svc.stop()
    log = svc.log.read_text()
    assert "Warning" not in log and "WARNING" not in log, log
