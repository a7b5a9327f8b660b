"""The preemption handshake over HTTP and WebSocket, on each store: a holder that asked for it
is told at once and the preemptor is answered only after its acknowledgement, or at the
deadline (``--preempt-ack-timeout``), with ``acknowledged`` saying which came first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from bs_coordination.service.config import SettingsError, settings_from

#: ``api`` and ``ws``: the helpers of tests/service/conftest.py.
Api = WsFactory = Any

#: The acknowledgement deadline of the services in this module (short: tests wait for it).
ACK_TIMEOUT = 0.6
#: The deadline of tests whose holders acknowledge in time (``@pytest.mark.ack_timeout``): far
#: longer than a loaded CI machine needs for a few requests, so only an acknowledgement ends it.
PATIENT = 10.0


@pytest.fixture
def service(store_url: str, service_factory: Any, request: pytest.FixtureRequest) -> Any:
    marker = request.node.get_closest_marker("ack_timeout")
    return service_factory(store_url,
                           preempt_ack_timeout=marker.args[0] if marker else ACK_TIMEOUT)


async def _ack(api: Api, key: str, device: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"lock_key": key}
    if device is not None:
        body["device_name"] = device
    return await api.client.post("/api/lock/ack", json=body)


@pytest.mark.ack_timeout(PATIENT)
async def test_the_preemptor_is_answered_after_the_holder_acknowledges(
        api: Api, ws: WsFactory) -> None:
    holder = await api.grant("m1", "QUEUE_EXECUTING", "queue", acknowledge_preemption=True)
    assert holder["locks"][0]["acknowledge_preemption"] is True
    async with ws() as w:
        preemptor = asyncio.create_task(api.lock("m1", "MAINTENANCE", "bob", reason="encoder"))
        # The holder is told at once, while the preemptor's answer waits.
        told = await w.update("preempted", "m1")
        assert told["lock"]["preemption_ack"] == "pending"
        assert told["lock"]["ack_deadline"] is not None
        assert told["lock"]["preempted_by"]["user_id"] == "bob"
        await asyncio.sleep(0.2)
        assert not preemptor.done()
        r = await _ack(api, holder["lock_key"], "m1")
        acked_at = time.monotonic()
        assert r.status_code == 200, r.text
        assert [lk["device_name"] for lk in r.json()["acknowledged"]] == ["m1"]
        answer = await preemptor
        answered_at = time.monotonic()
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["acknowledged"] is True
        assert answered_at - acked_at < PATIENT / 2  # the ack released it, not the deadline
        assert [p["user_id"] for p in body["preempted"]] == ["queue"]
        assert body["preempted"][0]["preemption_ack"] == "acknowledged"
        event = await w.update("acknowledged", "m1")
        assert event["lock"]["preemption_ack"] == "acknowledged"
        assert event["lock"]["acknowledged_at"] is not None
    # Status says who acknowledged, and when.
    status = await api.device("m1")
    assert status["lock"]["user_id"] == "bob"
    (waiting,) = status["preempted"]
    assert (waiting["user_id"], waiting["preemption_ack"]) == ("queue", "acknowledged")
    assert waiting["acknowledged_at"] is not None
    assert "lock_key" not in str(status)


async def test_without_acknowledgement_the_preemptor_is_answered_at_the_deadline(
        api: Api, ws: WsFactory) -> None:
    holder = await api.grant("m1", "QUEUE_EXECUTING", "queue", acknowledge_preemption=True)
    async with ws() as w:
        start = time.monotonic()
        answer = await api.lock("m1", "MAINTENANCE", "bob")
        took = time.monotonic() - start
        assert answer.status_code == 200, answer.text
        assert answer.json()["acknowledged"] is False
        assert "not every holder" in answer.json()["message"]
        assert ACK_TIMEOUT <= took < ACK_TIMEOUT + 0.5
        await w.update("preempted", "m1")
        late = await w.update("ack_timeout", "m1")
        assert late["lock"]["preemption_ack"] == "timed_out"
        # A late acknowledgement is recorded, and changes no answer.
        r = await _ack(api, holder["lock_key"])
        assert r.status_code == 200, r.text
        event = await w.update("acknowledged", "m1")
        assert event["lock"]["preemption_ack"] == "timed_out"
        assert event["lock"]["acknowledged_at"] is not None
    # Nothing left to acknowledge: 200, empty.
    r = await _ack(api, holder["lock_key"])
    assert r.status_code == 200 and r.json()["acknowledged"] == []


async def test_a_holder_that_did_not_ask_is_preempted_at_once(api: Api) -> None:
    await api.grant("m1", "QUEUE_EXECUTING", "queue")
    start = time.monotonic()
    body = await api.grant("m1", "MAINTENANCE", "bob")
    assert time.monotonic() - start < ACK_TIMEOUT
    assert body["acknowledged"] is True
    assert body["preempted"] == []
    status = await api.device("m1")
    assert status["preempted"][0]["preemption_ack"] is None
    # A grant that displaced nobody: acknowledged, no handshake.
    assert (await api.grant("m2", "MAINTENANCE", "bob"))["acknowledged"] is True


@pytest.mark.ack_timeout(PATIENT)
async def test_an_atomic_set_waits_for_every_displaced_holder(api: Api) -> None:
    a = await api.grant("m1", "QUEUE_EXECUTING", "queue", acknowledge_preemption=True)
    b = await api.grant("m2", "MANUAL_OPERATOR", "alice", acknowledge_preemption=True)
    preemptor = asyncio.create_task(api.lock(["m1", "m2"], "MAINTENANCE", "bob"))
    await asyncio.sleep(0.1)
    assert (await _ack(api, a["lock_key"])).status_code == 200
    await asyncio.sleep(0.1)
    assert not preemptor.done()  # one of two acknowledged
    assert (await _ack(api, b["lock_key"], "m2")).status_code == 200
    answer = await preemptor
    assert answer.json()["acknowledged"] is True
    assert sorted(p["device_name"] for p in answer.json()["preempted"]) == ["m1", "m2"]
    # Releasing maintenance restores both, with fresh tokens and no handshake state.
    await api.release(answer.json()["lock_key"])
    held = {lk["device_name"]: lk for lk in (await api.status())["locks"]}
    assert {n: (lk["state"], lk["preemption_ack"]) for n, lk in held.items()} == {
        "m1": ("active", None), "m2": ("active", None)}


async def test_a_holder_that_releases_during_the_handshake_counts_as_acknowledged(
        api: Api) -> None:
    holder = await api.grant("m1", "QUEUE_EXECUTING", "queue", acknowledge_preemption=True)
    preemptor = asyncio.create_task(api.lock("m1", "MAINTENANCE", "bob"))
    await asyncio.sleep(0.1)
    assert (await api.release(holder["lock_key"])).status_code == 200
    answer = await preemptor
    assert answer.json()["acknowledged"] is True


async def test_a_lease_that_ends_during_the_handshake_ends(api: Api, ws: WsFactory) -> None:
    await api.grant("m1", "QUEUE_EXECUTING", "queue", acknowledge_preemption=True, timeout=0.3)
    async with ws() as w:
        start = time.monotonic()
        answer = await api.lock("m1", "MAINTENANCE", "bob")
        assert answer.status_code == 200
        # Expired, not acknowledged: answered when the lease ended, before the deadline.
        assert answer.json()["acknowledged"] is False
        assert time.monotonic() - start < ACK_TIMEOUT + 0.5
        await w.update("expired", "m1")
    assert [lk["user_id"] for lk in (await api.status())["locks"]] == ["bob"]


@pytest.mark.ack_timeout(PATIENT)
async def test_a_preemptor_in_its_handshake_keeps_the_device_and_its_place(api: Api) -> None:
    holder = await api.grant("m1", "MANUAL_OPERATOR", "alice", acknowledge_preemption=True)
    preemptor = asyncio.create_task(api.lock("m1", "QUEUE_EXECUTING", "queue"))
    await asyncio.sleep(0.1)
    # While the handshake runs, the device is the preemptor's: equal priority is refused,
    # a waiting request queues behind it, a higher one preempts it in turn.
    refused = await api.lock("m1", "QUEUE_EXECUTING", "queue2")
    assert refused.status_code == 409
    assert refused.json()["conflicts"][0]["user_id"] == "queue"
    waiter = asyncio.create_task(api.lock("m1", "QUEUE_EXECUTING", "queue2", wait=5))
    assert (await _ack(api, holder["lock_key"])).status_code == 200
    answer = await preemptor
    assert answer.json()["acknowledged"] is True
    await asyncio.sleep(0.1)
    assert not waiter.done()
    # The release restores alice, whom the waiting request then preempts: a second handshake.
    await api.release(answer.json()["lock_key"])
    while not (await _ack(api, holder["lock_key"])).json()["acknowledged"]:
        await asyncio.sleep(0.02)
    granted = await waiter
    assert granted.status_code == 200 and granted.json()["acknowledged"] is True
    assert (await api.held())["m1"] == [("queue2", "QUEUE_EXECUTING", "active"),
                                        ("alice", "MANUAL_OPERATOR", "preempted")]


async def test_acknowledge_refusals(api: Api) -> None:
    a = await api.grant("m1", "MANUAL_OPERATOR", "alice", acknowledge_preemption=True)
    await api.grant("m2", "MANUAL_OPERATOR", "carol")
    r = await _ack(api, "no-such-key")
    assert r.status_code == 404
    r = await _ack(api, a["lock_key"], "m2")
    assert r.status_code == 403 and "carol" in r.json()["message"]
    r = await api.client.post("/api/lock/ack", json={"lock_key": a["lock_key"], "extra": 1})
    assert r.status_code == 422
    r = await api.client.post("/api/lock/request", json={
        "device_name": "m3", "lock_type": "MANUAL_OPERATOR", "user_id": "x",
        "acknowledge_preemption": "maybe"})
    assert r.status_code == 422
    # Nothing preempted: nothing to acknowledge, nothing changed.
    r = await _ack(api, a["lock_key"])
    assert r.status_code == 200 and r.json()["acknowledged"] == []


def test_the_deadline_setting() -> None:
    assert settings_from([], {}).preempt_ack_timeout == 2.0
    assert settings_from(["--preempt-ack-timeout", "0.5"], {}).preempt_ack_timeout == 0.5
    assert settings_from([], {"COORDINATION_PREEMPT_ACK_TIMEOUT": "3"}).preempt_ack_timeout == 3
    for bad in ("0", "-1", "abc", "nan", "1e9"):
        with pytest.raises(SettingsError, match=r"^--preempt-ack-timeout: "):
            settings_from(["--preempt-ack-timeout", bad], {})
    with pytest.raises(SettingsError, match=r"^COORDINATION_PREEMPT_ACK_TIMEOUT: "):
        settings_from([], {"COORDINATION_PREEMPT_ACK_TIMEOUT": "x"})


def test_openapi_describes_the_acknowledgement(service: Any) -> None:
    doc = httpx.get(service.url + "/openapi.json").json()
    assert "/api/lock/ack" in doc["paths"]
    props = doc["components"]["schemas"]["LockRequest"]["properties"]
    assert props["acknowledge_preemption"]["type"] == "boolean"
    assert "acknowledged" in doc["components"]["schemas"]["LockResponse"]["properties"]


async def test_a_preemptor_whose_own_lease_ends_during_its_handshake_is_told(api: Api) -> None:
    await api.grant("m1", "QUEUE_EXECUTING", "queue", acknowledge_preemption=True)
    r = await api.lock("m1", "MAINTENANCE", "bob", timeout=0.3)  # ends before the 0.6 s deadline
    assert r.status_code == 404, r.text
    assert "ended" in r.json()["message"] and "'m1'" in r.json()["message"]
    # The displaced holder is back (its lock restored when the preemptor's expired).
    assert (await api.held())["m1"] == [("queue", "QUEUE_EXECUTING", "active")]
