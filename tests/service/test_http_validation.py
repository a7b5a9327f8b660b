"""Bad input: a clear 4xx whose message names the problem, and nothing changed."""

from __future__ import annotations

import pytest

OK = {"device_name": "det1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"}


def with_(**changes):
    body = {**OK, **changes}
    return {k: v for k, v in body.items() if v is not ...}


BAD_LOCK_REQUESTS = {
    "unknown lock type": (with_(lock_type="SUPERUSER"), "lock_type"),
    "lowercase lock type": (with_(lock_type="maintenance"), "lock_type"),
    "empty device name": (with_(device_name=""), "device_name"),
    "missing device name": (with_(device_name=...), "device_name"),
    "blank device name": (with_(device_name="   "), "device_name"),
    "device name with a space": (with_(device_name="det 1"), "device_name"),
    "device name with a trailing dot": (with_(device_name="det1."), "device_name"),
    "empty device list": (with_(device_name=..., device_names=[]), "device_names"),
    "both name forms": (with_(device_names=["det2"]), "device_name"),
    "overlapping names": (with_(device_name=..., device_names=["det1", "det1.cam"]), "device_names"),
    "zero timeout": (with_(timeout=0), "timeout"),
    "negative timeout": (with_(timeout=-5), "timeout"),
    "text timeout": (with_(timeout="soon"), "timeout"),
    "number as text timeout": (with_(timeout="30"), "timeout"),
    "boolean timeout": (with_(timeout=True), "timeout"),
    "timeout below the minimum lease": (with_(timeout=1e-9), "timeout"),
    "number as text wait": (with_(wait="5"), "wait"),
    "boolean wait": (with_(wait=True), "wait"),
    "queue lock without a lease": (with_(lock_type="QUEUE_EXECUTING", timeout=None), "timeout"),
    "queued lock without a lease": (with_(lock_type="QUEUE_QUEUED", timeout=None), "timeout"),
    "negative wait": (with_(wait=-1), "wait"),
    "missing user": (with_(user_id=...), "user_id"),
    "empty user": (with_(user_id=""), "user_id"),
    "unknown field": (with_(priority=0), "priority"),
    "misspelt field": (with_(timout=10), "timout"),
    "not an object": ([OK], "body"),
}


@pytest.fixture
async def baseline(api):
    """A table with one lock; every test checks it is exactly the same afterwards."""
    await api.grant("det1", "MANUAL_OPERATOR", "bob")
    before = await api.status()

    async def unchanged() -> None:
        after = await api.status()
        assert after["locks"] == before["locks"]
        assert after["last_event_id"] == before["last_event_id"]

    return unchanged


def check_422(r, field: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["success"] is False
    assert field in body["message"], body["message"]
    assert isinstance(body["detail"], list) and body["detail"]


async def test_bad_lock_requests_are_422_naming_the_field(api, baseline) -> None:
    # One server for all the cases (each case is independent: the table never changes).
    for case, (body, field) in BAD_LOCK_REQUESTS.items():
        r = await api.client.post("/api/lock/request", json=body)
        try:
            check_422(r, field)
        except AssertionError as exc:
            raise AssertionError(f"case {case!r}: {exc}") from None
    await baseline()


async def test_malformed_json_is_422(api, baseline) -> None:
    for raw in (b"{bad json", b"", b"null", b'{"device_name": "det1",}', b"\xff\xfe"):
        r = await api.client.post("/api/lock/request", content=raw,
                                  headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        message = r.json()["message"]
        assert "JSON" in message or "body" in message, (raw, message)
    await baseline()


async def test_bad_release_renew_and_force_release(api, baseline) -> None:
    c = api.client
    check_422(await c.post("/api/lock/release", json={"device_name": "det1"}), "lock_key")
    check_422(await c.post("/api/lock/release", json={"lock_key": "k", "extra": 1}), "extra")
    check_422(await c.post("/api/lock/release", json={"lock_key": "k", "device_name": "a b"}),
              "device_name")
    check_422(await c.post("/api/lock/release", json={"lock_key": ""}), "lock_key")
    # The original service's query form (deprecated) is validated the same way.
    check_422(await c.post("/api/lock/release", params={"device_name": "det1"}), "lock_key")
    check_422(await c.post("/api/lock/release", params={"lock_key": "k", "device_name": "a b"}),
              "device_name")
    check_422(await c.post("/api/lock/release", params={"lock_key": ""}), "lock_key")
    check_422(await c.post("/api/lock/release", params={"lock_key": "k", "user_id": ""}), "user_id")
    r = await c.post("/api/lock/release", params={"lock_key": "k", "device_name": "a b"})
    assert r.json()["detail"][0]["loc"] == ["query", "device_name"], r.text
    check_422(await c.post("/api/lock/renew", json={"lock_key": "k", "timeout": 0}), "timeout")
    for timeout in ("30", True, 1e-9):
        check_422(await c.post("/api/lock/renew", json={"lock_key": "k", "timeout": timeout}),
                  "timeout")
    check_422(await c.post("/api/lock/renew", json={"timeout": 5}), "lock_key")
    check_422(await c.post("/api/lock/force-release", json={}), "device_name")
    check_422(await c.post("/api/lock/force-release", json={"device_name": "x y"}), "device_name")
    await baseline()


async def test_a_key_serves_only_its_own_holder(api) -> None:
    alice = (await api.grant("det1", "MANUAL_OPERATOR", "alice"))["lock_key"]
    before = await api.status()
    # bob presents alice's key: refused, and nothing is added under it.
    for device in ("det2", "det1"):
        r = await api.lock(device, "MANUAL_OPERATOR", "bob", lock_key=alice)
        check_422(r, "user_id")
        assert "alice" in r.json()["message"]
    r = await api.lock(["det2", "det3"], "MAINTENANCE", "bob", lock_key=alice)
    check_422(r, "user_id")
    after = await api.status()
    assert after["locks"] == before["locks"]
    assert after["last_event_id"] == before["last_event_id"]
    # alice herself may add devices under her key.
    r = await api.lock("det2", "MANUAL_OPERATOR", "alice", lock_key=alice)
    assert r.status_code == 200, r.text
    assert r.json()["lock_key"] == alice


async def test_the_minimum_lease_is_accepted(api) -> None:
    from bs_coordination.models import MIN_LEASE_SECONDS

    body = await api.grant("det1", "MANUAL_OPERATOR", "alice", timeout=MIN_LEASE_SECONDS)
    assert body["expires_at"] is not None


async def test_bad_device_name_in_path_is_422(api) -> None:
    r = await api.client.get("/api/locks/device/det 1")
    check_422(r, "device_name")
    r = await api.client.get("/api/locks/device/det1.")
    check_422(r, "device_name")


async def test_bad_events_query_is_422(api) -> None:
    check_422(await api.client.get("/api/events", params={"since": "yesterday"}), "since")
    check_422(await api.client.get("/api/events", params={"limit": 0}), "limit")


async def test_unknown_path_and_method(api) -> None:
    assert (await api.client.get("/api/lock/request")).status_code == 405
    assert (await api.client.get("/api/nothing-here")).status_code == 404
