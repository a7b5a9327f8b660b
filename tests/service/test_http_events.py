"""Leases and expiry, the event history, health probes and the OpenAPI description."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect

from bs_coordination.stores import MemoryStore

SHORT_LEASE = 0.3


async def test_lease_expiry_emits_expired_and_frees_the_device(api, ws) -> None:
    async with ws() as c:
        body = await api.grant("det1", "QUEUE_EXECUTING", "queue", timeout=SHORT_LEASE)
        await c.update("acquired", "det1")
        frame = await c.update("expired", "det1")
        assert frame["lock"]["user_id"] == "queue" and frame["lock"]["token"] == body["token"]
    assert (await api.device("det1"))["locked"] is False
    assert (await api.status())["locks"] == []
    # The expired key is worthless now.
    assert (await api.release(body["lock_key"])).status_code == 404
    assert (await api.lock("det1", "QUEUE_EXECUTING", "other", timeout=60)).status_code == 200
    assert "expired" in [e["action"] for e in await api.events()]


async def test_a_preempted_lock_expires_too_and_is_not_restored(api, ws) -> None:
    async with ws() as c:
        await api.grant("det1", "MANUAL_OPERATOR", "alice", timeout=SHORT_LEASE)
        staff = await api.grant("det1", "MAINTENANCE", "staff", timeout=None)
        await c.update("preempted", "det1")
        frame = await c.update("expired", "det1")
        assert frame["lock"]["user_id"] == "alice" and frame["lock"]["state"] == "preempted"
        await api.release(staff["lock_key"])
        await c.update("released", "det1")
    assert (await api.status())["locks"] == []
    assert "restored" not in [e["action"] for e in await api.events()]


async def test_expiry_hands_the_device_to_what_it_preempted(api, ws) -> None:
    async with ws() as c:
        await api.grant("det1", "QUEUE_QUEUED", "queue", timeout=60)
        await api.grant("det1", "MANUAL_OPERATOR", "alice", timeout=SHORT_LEASE)
        await c.update("expired", "det1")
        frame = await c.update("restored", "det1")
        assert frame["lock"]["user_id"] == "queue"
    assert await api.held() == {"det1": [("queue", "QUEUE_QUEUED", "active")]}


async def test_events_history_pages_with_since_and_limit(api) -> None:
    assert await api.events() == []
    for i in range(5):
        body = await api.grant(f"dev{i}")
        await api.release(body["lock_key"], user="alice")
    events = await api.events()
    assert [e["action"] for e in events] == ["acquired", "released"] * 5
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == 10
    r = await api.client.get("/api/events", params={"since": ids[3], "limit": 4})
    page = r.json()
    assert [e["event_id"] for e in page["events"]] == ids[4:8]
    assert page["last_event_id"] == ids[7]
    assert await api.events(since=ids[-1]) == []
    status = await api.status()
    assert status["last_event_id"] == ids[-1]
    for e in events:
        assert e["type"] == "lock_update" and e["actor"] == "alice"
        assert set(e) >= {"action", "device_name", "lock", "timestamp", "event_id"}


async def test_events_since_a_trimmed_id_is_410(service_factory) -> None:
    svc = service_factory(store=MemoryStore(event_log_size=4))
    async with httpx.AsyncClient(base_url=svc.url) as c:
        first_id = None
        for i in range(4):
            r = await c.post("/api/lock/request", json={
                "device_name": f"d{i}", "lock_type": "MANUAL_OPERATOR", "user_id": "a"})
            key = r.json()["lock_key"]
            if first_id is None:
                first_id = (await c.get("/api/events")).json()["events"][0]["event_id"]
            await c.post("/api/lock/release", json={"lock_key": key})
        r = await c.get("/api/events", params={"since": first_id})
        assert r.status_code == 410
        assert "since" in r.json()["message"] and "last_event_id" in r.json()["message"]
        kept = (await c.get("/api/events")).json()["events"]
        assert len(kept) == 4
        r = await c.get("/api/events", params={"since": kept[1]["event_id"]})
        assert r.status_code == 200 and r.json()["events"] == kept[2:]


async def test_health_probes(service, http) -> None:
    r = await http.get("/api/health/live")
    assert r.status_code == 200 and r.json() == {"status": "alive"}
    r = await http.get("/api/health/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready" and r.json()["store"] == service.settings.store.split(":")[0]


@pytest.mark.redis
async def test_redis_down_fails_closed_and_recovers(redis_server, service_factory) -> None:
    svc = service_factory(redis_server.url)
    async with httpx.AsyncClient(base_url=svc.url, timeout=30) as c:
        lock = {"device_name": "det1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"}
        r = await c.post("/api/lock/request", json=lock)
        assert r.status_code == 200
        redis_server.kill()
        try:
            r = await c.get("/api/health/ready")
            assert r.status_code == 503 and r.json()["status"] == "not ready" and r.json()["reason"]
            r = await c.post("/api/lock/request", json={**lock, "device_name": "det2"})
            assert r.status_code == 503, r.text
            assert (await c.get("/api/health/live")).status_code == 200
        finally:
            redis_server.start()
        r = await c.get("/api/health/ready")
        assert r.status_code == 200
        # The event hub followed the outage and resumes: live events flow again.
        async with connect(svc.ws_url) as w:
            assert json.loads(await w.recv())["type"] == "initial_status"
            r = await c.post("/api/lock/request", json={**lock, "device_name": "det3"})
            assert r.status_code == 200, r.text
            frame = json.loads(await asyncio.wait_for(w.recv(), 10))
            assert (frame["action"], frame["device_name"]) == ("acquired", "det3")


async def test_openapi_describes_every_endpoint_and_error(http) -> None:
    spec = (await http.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("/api/lock/request", "post"): {"200", "404", "409", "422", "503"},
        ("/api/lock/release", "post"): {"200", "403", "404", "422", "503"},
        ("/api/lock/renew", "post"): {"200", "404", "422", "503"},
        ("/api/lock/force-release", "post"): {"200", "404", "422", "503"},
        ("/api/locks/status", "get"): {"200", "503"},
        ("/api/locks/device/{device_name}", "get"): {"200", "422", "503"},
        ("/api/events", "get"): {"200", "410", "422", "503"},
        ("/api/health/live", "get"): {"200"},
        ("/api/health/ready", "get"): {"200", "503"},
    }
    for (path, method), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert codes <= set(responses), (path, set(responses))
        for code in codes - {"200"}:
            assert "application/json" in responses[code]["content"], (path, code)
    conflict = paths["/api/lock/request"]["post"]["responses"]["409"]["content"]
    assert conflict["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    release_params = {p["name"]: p for p in paths["/api/lock/release"]["post"]["parameters"]}
    assert release_params["lock_key"]["deprecated"] is True


async def test_events_since_an_id_never_issued_is_410(api) -> None:
    """A client that outlived a restart of a memory-store service must not wait forever."""
    await api.grant("det1")
    last = (await api.status())["last_event_id"]
    never = "99999999999999-0" if "-" in last else "99999"
    r = await api.client.get("/api/events", params={"since": never})
    assert r.status_code == 410 and "restart" in r.json()["message"]
    r = await api.client.get("/api/events", params={"since": "0"})
    assert r.status_code == 200 and len(r.json()["events"]) == 1
