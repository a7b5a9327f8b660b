"""The service on the etcd store, as a user meets it: two replicas on one etcd (a WebSocket
client of B sees the locks taken through A, in order, with their tokens), and an etcd outage
(503 and "not ready" meanwhile, nothing granted, back by itself)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from etcd_nodes import EtcdCluster, etcd_cluster
from websockets.asyncio.client import connect

PROMPTLY = 10.0


async def lock(client: httpx.AsyncClient, base: str, device: str, user: str, **fields: Any) -> httpx.Response:
    return await client.post(f"{base}/api/lock/request", json={
        "device_name": device, "lock_type": "MANUAL_OPERATOR", "user_id": user, **fields})


@contextlib.asynccontextmanager
async def ws_updates(url: str) -> AsyncIterator[list[dict[str, Any]]]:
    """A WebSocket client; yields the list its ``lock_update`` messages go to."""
    received: list[dict[str, Any]] = []
    async with connect(url) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), PROMPTLY))["type"] == "initial_status"

        async def pump() -> None:
            async for text in ws:
                msg = json.loads(text)
                if msg.get("type") == "lock_update":
                    received.append(msg)

        task = asyncio.create_task(pump())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_client_of_replica_b_sees_locks_taken_through_replica_a(
        etcd_url: str, service_factory, eventually) -> None:
    a, b = service_factory(etcd_url), service_factory(etcd_url)
    async with ws_updates(b.ws_url) as seen_by_b, httpx.AsyncClient(timeout=10) as http:
        first = await lock(http, a.url, "det1", "alice", reason="alignment")
        assert first.status_code == 200
        refused = await lock(http, b.url, "det1.cam", "bob")
        assert refused.status_code == 409 and "alice" in refused.json()["message"]
        staff = await http.post(f"{b.url}/api/lock/request", json={
            "device_name": "det1", "lock_type": "MAINTENANCE", "user_id": "staff", "timeout": None})
        assert staff.status_code == 200
        released = await http.post(f"{a.url}/api/lock/release", json={
            "lock_key": staff.json()["lock_key"], "device_name": "det1"})
        assert released.status_code == 200

        async def five() -> bool:
            return len(seen_by_b) >= 5
        await eventually(five)
        status_a = (await http.get(f"{a.url}/api/locks/status")).json()
    assert [(m["action"], m["lock"]["user_id"]) for m in seen_by_b] == [
        ("acquired", "alice"), ("preempted", "alice"), ("acquired", "staff"),
        ("released", "staff"), ("restored", "alice")]
    assert seen_by_b[0]["lock"]["token"] == first.json()["token"]
    tokens = [m["lock"]["token"] for m in seen_by_b if m["action"] in ("acquired", "restored")]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    [held] = status_a["locks"]
    assert held["user_id"] == "alice" and held["token"] == tokens[-1]
    assert first.json()["lock_key"] not in json.dumps(seen_by_b)


@pytest.fixture
def own_etcd() -> Iterator[EtcdCluster]:
    with etcd_cluster(1) as cluster:
        yield cluster


async def test_an_etcd_outage_fails_closed_and_heals(own_etcd: EtcdCluster, service_factory) -> None:
    svc = service_factory(own_etcd.url, store_timeout=1.0)
    async with httpx.AsyncClient(timeout=10) as http:
        kept = await lock(http, svc.url, "det1", "alice", timeout=600)
        assert kept.status_code == 200
        assert (await http.get(f"{svc.url}/api/health/ready")).status_code == 200

        node = own_etcd.nodes[0]
        node.kill()
        r = await lock(http, svc.url, "det2", "bob")
        assert r.status_code == 503 and "unavailable" in r.json()["message"]
        ready = await http.get(f"{svc.url}/api/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        assert (await http.get(f"{svc.url}/api/health/live")).status_code == 200

        node.start()
        own_etcd.wait_for_leader()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROMPTLY
        while (await http.get(f"{svc.url}/api/health/ready")).status_code != 200:
            assert loop.time() < deadline, "the service did not become ready again"
            await asyncio.sleep(0.1)
        held = (await http.get(f"{svc.url}/api/locks/device/det1")).json()
        assert held["locked"] and held["lock"]["token"] == kept.json()["token"]
        assert (await lock(http, svc.url, "det1", "bob")).status_code == 409
        assert (await lock(http, svc.url, "det2", "bob")).status_code == 200
        assert [x["device_name"] for x in (await http.get(f"{svc.url}/api/locks/status")).json()["locks"]] == [
            "det1", "det2"]
