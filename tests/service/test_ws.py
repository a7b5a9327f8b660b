"""``WS /ws`` through a raw WebSocket client against a real server (every store)."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bs_coordination.stores.base import event_order

LOCK_FIELDS = {"device_name", "lock_type", "priority", "user_id", "reason", "plan_uid",
               "acquired_at", "expires_at", "token", "state", "preempted_by",
               # the preemption handshake
               "acknowledge_preemption", "preemption_ack", "ack_deadline", "acknowledged_at"}


async def test_initial_status_lists_every_lock(api, ws) -> None:
    await api.grant("det1", "MANUAL_OPERATOR", "alice")
    await api.grant("det1", "MAINTENANCE", "staff")
    await api.grant(["m1", "m2"], "QUEUE_EXECUTING", "queue", timeout=60)
    async with ws() as c:
        first = c.frames[0]
    data = first["data"]
    assert set(data) == {"locks", "total_count", "timestamp", "last_event_id"}
    assert data["total_count"] == 4 == len(data["locks"])
    assert {(lk["device_name"], lk["user_id"], lk["state"]) for lk in data["locks"]} == {
        ("det1", "alice", "preempted"), ("det1", "staff", "active"),
        ("m1", "queue", "active"), ("m2", "queue", "active")}
    assert data["last_event_id"] == (await api.status())["last_event_id"]
    for lk in data["locks"]:
        assert set(lk) == LOCK_FIELDS


async def test_lock_update_for_every_action(api, ws) -> None:
    async with ws() as c:
        alice = await api.grant("det1", "MANUAL_OPERATOR", "alice", timeout=60)
        await c.update("acquired", "det1")
        staff = await api.grant("det1", "MAINTENANCE", "staff", timeout=None)
        assert (await c.update("preempted", "det1"))["lock"]["user_id"] == "alice"
        assert (await c.update("acquired", "det1"))["lock"]["user_id"] == "staff"
        await api.release(staff["lock_key"], "det1", "staff")
        released = await c.update("released", "det1")
        assert released["lock"]["user_id"] == "staff" and released["actor"] == "staff"
        restored = await c.update("restored", "det1")
        assert restored["lock"]["user_id"] == "alice" and restored["lock"]["token"] > staff["token"]
        r = await api.client.post("/api/lock/renew", json={"lock_key": alice["lock_key"],
                                                           "timeout": 120})
        assert r.status_code == 200
        renewed = await c.update("renewed", "det1")
        assert renewed["lock"]["expires_at"] == r.json()["expires_at"]
        r = await api.client.post("/api/lock/force-release", json={"device_name": "det1"})
        assert r.status_code == 200
        assert (await c.update("force_released", "det1"))["lock"]["user_id"] == "alice"

        queued = await api.grant("m1", "QUEUE_QUEUED", "queue", timeout=60, plan_uid="p1")
        await c.update("acquired", "m1")
        await api.grant("m1", "QUEUE_EXECUTING", "queue", timeout=60, lock_key=queued["lock_key"])
        assert (await c.update("upgraded", "m1"))["lock"]["lock_type"] == "QUEUE_EXECUTING"
        await api.grant("m2", "QUEUE_QUEUED", "queue", timeout=60, plan_uid="p2")
        await api.grant("m2", "QUEUE_EXECUTING", "queue", timeout=60, plan_uid="p2")
        consumed = await c.update("consumed", "m2")
        assert consumed["lock"]["lock_type"] == "QUEUE_QUEUED" and consumed["lock"]["plan_uid"] == "p2"

        await api.grant("m3", "QUEUE_EXECUTING", "queue", timeout=0.3)
        await c.update("expired", "m3")

    updates = [f for f in c.frames if f["type"] == "lock_update"]
    assert {f["action"] for f in updates} == {
        "acquired", "released", "preempted", "restored", "expired", "force_released",
        "renewed", "upgraded", "consumed"}
    orders = [event_order(f["event_id"]) for f in updates]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    for f in updates:
        assert set(f) == {"type", "action", "device_name", "lock", "timestamp", "event_id", "actor",
                          "reason"}
        assert set(f["lock"]) == LOCK_FIELDS
    # The socket saw exactly the history.
    history = await api.events()
    assert [e["event_id"] for e in history] == [f["event_id"] for f in updates]


async def test_ping_status_and_bad_messages(api, ws) -> None:
    async with ws() as c:
        await c.send({"type": "ping"})
        pong = await c.recv()
        assert pong["type"] == "pong" and pong["timestamp"]
        await api.grant("det1")
        await c.update("acquired", "det1")
        await c.send({"type": "get_status"})
        status = await c.expect(lambda f: f["type"] == "status")
        assert set(status["data"]) == {"locks", "total_count", "timestamp", "last_event_id"}
        assert status["data"]["total_count"] == 1
        assert status["data"]["last_event_id"] == (await api.status())["last_event_id"]
        for bad in ({"type": "subscribe"}, "not json", "[1, 2]", {"no": "type"}, b"\x00binary"):
            await c.send(bad)
            err = await c.recv()
            assert err["type"] == "error" and err["message"], bad
        # Still open and answering.
        await c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"


async def test_oversized_message_closes_the_connection(ws) -> None:
    async with ws() as c:
        await c.send(json.dumps({"type": "ping", "pad": "x" * 10_000}))
        err = await c.recv()
        assert err["type"] == "error" and "too large" in err["message"]
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_since_resumes_without_gap_or_duplicate(api, ws) -> None:
    async with ws() as c:
        await api.grant("a1")
        first = await c.update("acquired", "a1")
    resume_from = first["event_id"]
    # While disconnected: more changes.
    b = await api.grant(["b1", "b2"])
    await api.release(b["lock_key"])
    async with ws(since=resume_from) as c:
        assert c.frames[0]["data"]["total_count"] == 1
        replayed = await c.updates(4)
        pairs = [(f["action"], f["device_name"]) for f in replayed]
        assert pairs[:2] == [("acquired", "b1"), ("acquired", "b2")]
        assert sorted(pairs[2:]) == [("released", "b1"), ("released", "b2")]
        await api.grant("c1")
        live = await c.update("acquired", "c1")
    updates = [f for f in c.frames if f["type"] == "lock_update"]
    history = await api.events(since=resume_from)
    assert [f["event_id"] for f in updates] == [e["event_id"] for e in history]
    assert updates[-1] == live


async def test_since_during_a_burst_of_changes(api, ws) -> None:
    """Changes racing with the connection: the replay and the live stream meet exactly."""
    start = (await api.status())["last_event_id"] or "0"

    async def churn() -> None:
        for i in range(30):
            body = await api.grant(f"dev{i % 3}")
            await api.release(body["lock_key"])

    task = asyncio.create_task(churn())
    await asyncio.sleep(0.05)
    async with ws(since=start) as c:
        await task
        await c.updates(60)
    ids = [f["event_id"] for f in c.frames if f["type"] == "lock_update"]
    assert ids == [e["event_id"] for e in await api.events(since=start)]


async def test_bad_since_is_refused(ws) -> None:
    async with ws(since="not-an-id", read_initial=False) as c:
        err = await c.recv()
        assert err["type"] == "error" and "since" in err["message"]
        with pytest.raises(ConnectionClosed):
            await c.recv()


async def test_no_lock_key_in_any_status_event_or_frame(api, ws) -> None:
    async with ws() as c:
        a = await api.grant(["det1", "det2.cam"], "MANUAL_OPERATOR", "alice", timeout=60)
        s = await api.grant("det1", "MAINTENANCE", "staff", timeout=None, reason="fix")
        await api.client.post("/api/lock/renew", json={"lock_key": a["lock_key"], "timeout": 90})
        await api.release(s["lock_key"], "det1")
        q = await api.grant("m1", "QUEUE_QUEUED", "queue", timeout=60, plan_uid="p")
        await api.grant("m1", "QUEUE_EXECUTING", "queue", timeout=60, lock_key=q["lock_key"])
        await api.grant("m2", "QUEUE_EXECUTING", "queue", timeout=0.3)
        await c.update("expired", "m2")
        await api.client.post("/api/lock/release", params={"lock_key": a["lock_key"],
                                                           "device_name": "det2.cam"})
        await c.update("released", "det2.cam")
        await c.send({"type": "get_status"})
        await c.expect(lambda f: f["type"] == "status")
    async with ws(since="0") as c2:
        await c2.updates(len([f for f in c.frames if f["type"] == "lock_update"]))
    texts = c.raw + c2.raw + [
        (await api.client.get("/api/locks/status")).text,
        (await api.client.get("/api/events")).text,
        (await api.client.get("/api/locks/device/det1")).text,
        (await api.client.get("/api/locks/device/det2")).text,
        (await api.client.get("/api/locks/device/m1")).text,
    ]
    assert len(api.keys) == 4
    for text in texts:
        assert "lock_key" not in text and "key_hash" not in text
        for key in api.keys:
            assert key not in text


def _stalled_socket(port: int) -> socket.socket:
    """A connected TCP socket with a tiny receive buffer, so the server's writes back up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_a_stalled_subscriber_is_dropped_and_never_delays_others(
        store_url, service_factory, caplog) -> None:
    svc = service_factory(store_url, ws_queue_size=50)
    # Big events (~2 kB each, uncompressed for the stalled client) so its socket buffers
    # fill quickly.
    big = {"reason": "r" * 1000, "user_id": "u" * 200, "plan_uid": "p" * 200}
    devices = [f"{'stall' * 28}{i}" for i in range(100)]
    per_round = 2 * len(devices)
    received: list[dict] = []
    expected = 0
    caught_up = asyncio.Event()

    async def read_healthy(conn) -> None:
        async for text in conn:
            received.append(json.loads(text))
            if len(received) == expected:
                caught_up.set()

    def dropped() -> bool:
        return any("dropping a WebSocket subscriber" in r.getMessage() for r in caplog.records)

    async with httpx.AsyncClient(base_url=svc.url, timeout=30) as http, \
            connect(svc.ws_url) as healthy, \
            connect(svc.ws_url, sock=_stalled_socket(svc.port), max_queue=1,
                    compression=None) as stalled:
        assert json.loads(await healthy.recv())["type"] == "initial_status"
        assert json.loads(await stalled.recv())["type"] == "initial_status"
        reader = asyncio.create_task(read_healthy(healthy))
        try:
            # From here on the stalled client reads nothing. Rounds until the service drops it
            # (its send buffers hold a few MB first).
            for _ in range(30):
                caught_up.clear()
                expected += per_round
                r = await http.post("/api/lock/request", json={
                    "device_names": devices, "lock_type": "QUEUE_EXECUTING", "timeout": 60,
                    **big})
                assert r.status_code == 200, r.text
                r = await http.post("/api/lock/release", json={"lock_key": r.json()["lock_key"]})
                assert r.status_code == 200
                # The healthy subscriber gets every event of the round, stall or no stall.
                await asyncio.wait_for(caught_up.wait(), 10)
                if dropped():
                    break
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert dropped(), "the stalled subscriber was never dropped"
        assert all(f["type"] == "lock_update" for f in received)
        orders = [event_order(f["event_id"]) for f in received]
        assert orders == sorted(orders) and len(set(orders)) == expected
        # Reading now, the stalled client finds events, then the error, then the end.
        error = None
        with pytest.raises(ConnectionClosed):
            while True:
                frame = json.loads(await asyncio.wait_for(stalled.recv(), 10))
                if frame["type"] == "error":
                    error = frame
        assert error is not None, "the stalled subscriber was never told why it was dropped"
        assert "too slow" in error["message"] and "since=" in error["message"]
        since = error["message"].rsplit("since=", 1)[1]
        event_order(since)  # a real event id to resume from
        # And the service is still fine for the healthy one.
        await healthy.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(healthy.recv(), 10))["type"] == "pong"


async def test_since_an_id_never_issued_continues_from_the_snapshot(api, ws) -> None:
    await api.grant("det1")
    last = (await api.status())["last_event_id"]
    never = "99999999999999-0" if "-" in last else "99999"
    async with ws(since=never) as c:
        assert c.frames[0]["data"]["total_count"] == 1
        err = await c.recv()
        assert err["type"] == "error" and "restart" in err["message"]
        await api.grant("det2")
        assert (await c.update("acquired", "det2"))["event_id"] != last
