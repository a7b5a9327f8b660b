"""With authentication on: 401 without a valid key everywhere but the health probes, each role
does exactly its row of the table and gets 403 for the rest, and the key's principal is who
the lock and the event name."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from security_helpers import ROLES, auth, lock_body

HEALTH = ("/api/health/live", "/api/health/ready")


#: Routes FastAPI adds itself, outside the OpenAPI document.
DOC_ROUTES = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"),
              ("GET", "/redoc")]


def endpoints(service: Any, key: str) -> list[tuple[str, str]]:
    """(method, path) of every documented operation (path parameters filled in) and of the
    documentation routes."""
    doc = httpx.get(service.url + "/openapi.json", headers=auth(key)).json()
    out = [(m.upper(), re.sub(r"\{[^}]+\}", "det1", p))
           for p, item in doc["paths"].items() for m in item]
    return out + DOC_ROUTES


def test_no_key_or_a_wrong_key_is_401_everywhere_but_health(secure, as_, keys) -> None:
    routes = endpoints(secure, keys["reader"])
    paths = {p for _, p in routes}
    assert {"/api/locks/status", "/api/lock/request", "/api/events", *HEALTH} <= paths
    callers = {
        "no key": as_(None),
        "unknown key": as_(None, key="not-a-key-of-this-service"),
        "empty key": httpx.Client(base_url=secure.url, headers={"Authorization": "ApiKey"}),
        "wrong scheme": httpx.Client(base_url=secure.url,
                                     headers={"Authorization": "Bearer whatever"}),
    }
    try:
        for what, client in callers.items():
            for method, path in routes:
                r = client.request(method, path, json={} if method == "POST" else None)
                if path in HEALTH:
                    assert r.status_code == 200, (what, method, path, r.text)
                    continue
                assert r.status_code == 401, (what, method, path, r.status_code, r.text)
                assert r.headers["www-authenticate"] == "ApiKey"
                body = r.json()
                assert body["success"] is False and body["message"], body
                assert "not-a-key" not in r.text and "whatever" not in r.text
    finally:
        callers["empty key"].close()
        callers["wrong scheme"].close()


def test_the_scheme_word_is_case_insensitive(secure, keys) -> None:
    with httpx.Client(base_url=secure.url, headers={"Authorization": f"apikey {keys['reader']}"}) as c:
        assert c.get("/api/locks/status").status_code == 200


def test_health_needs_no_key(secure, as_) -> None:
    anon = as_(None)
    assert anon.get("/api/health/live").json() == {"status": "alive"}
    assert anon.get("/api/health/ready").json()["status"] == "ready"


# -- the role table --------------------------------------------------------------------------
ALLOWED: dict[str, set[str]] = {
    # action -> principals that may do it (everyone else gets 403)
    "read status": set(ROLES),
    "read device": set(ROLES),
    "read events": set(ROLES),
    "read openapi": set(ROLES),
    "lock MANUAL_OPERATOR": {"alice", "bob", "root"},
    "lock QUEUE_EXECUTING": {"qs", "root"},
    "lock QUEUE_QUEUED": {"qs", "root"},
    "lock MAINTENANCE": {"root"},
    "release own": {"alice", "bob", "qs", "root"},
    "renew own": {"alice", "bob", "qs", "root"},
    "force-release": {"root"},
}

#: A lock type each principal may hold (for its own release and renewal).
OWN_TYPE = {"alice": "MANUAL_OPERATOR", "bob": "MANUAL_OPERATOR", "qs": "QUEUE_EXECUTING",
            "root": "MAINTENANCE"}


def prepare(action: str, who: str, as_: Any) -> Callable[[httpx.Client], httpx.Response]:
    """Set up what ``action`` needs (as someone allowed to), and return the action itself."""
    dev = f"{action.replace(' ', '_')}.{who}"
    if action == "read status":
        return lambda c: c.get("/api/locks/status")
    if action == "read device":
        return lambda c: c.get("/api/locks/device/det1")
    if action == "read events":
        return lambda c: c.get("/api/events")
    if action == "read openapi":
        return lambda c: c.get("/openapi.json")
    if action.startswith("lock "):
        body = lock_body(dev, action.split()[1], timeout=60)
        return lambda c: c.post("/api/lock/request", json=body)
    if action in ("release own", "renew own"):
        # The lock is taken by the principal itself where it can, else (read) by alice.
        owner = who if who in OWN_TYPE else "alice"
        r = as_(owner).post("/api/lock/request", json=lock_body(dev, OWN_TYPE[owner], timeout=60))
        assert r.status_code == 200, r.text
        key = r.json()["lock_key"]
        if action == "release own":
            return lambda c: c.post("/api/lock/release", json={"lock_key": key, "device_name": dev})
        return lambda c: c.post("/api/lock/renew", json={"lock_key": key, "timeout": 120})
    if action == "force-release":
        r = as_("alice").post("/api/lock/request", json=lock_body(dev))
        assert r.status_code == 200, r.text
        return lambda c: c.post("/api/lock/force-release", json={"device_name": dev})
    raise AssertionError(action)


@pytest.mark.parametrize("who", sorted(ROLES))
def test_each_role_does_exactly_its_row(secure, as_, who: str) -> None:
    c, root = as_(who), as_("root")
    for action, allowed in ALLOWED.items():
        act = prepare(action, who, as_)
        before = root.get("/api/locks/status").json()
        r = act(c)
        if who in allowed:
            assert r.status_code == 200, (who, action, r.text)
            continue
        assert r.status_code == 403, (who, action, r.status_code, r.text)
        body = r.json()
        assert body["success"] is False
        assert "role" in body["message"] and repr(who) in body["message"], body["message"]
        after = root.get("/api/locks/status").json()
        assert (after["locks"], after["last_event_id"]) == (before["locks"], before["last_event_id"])


def test_the_body_cannot_claim_another_user(secure, as_) -> None:
    alice = as_("alice")
    r = alice.post("/api/lock/request", json=lock_body("det1", user="bob"))
    assert r.status_code == 200, r.text
    assert r.json()["locks"][0]["user_id"] == "alice"
    key = r.json()["lock_key"]
    status = alice.get("/api/locks/device/det1").json()
    assert status["lock"]["user_id"] == "alice"
    r = alice.post("/api/lock/release", json={"lock_key": key, "device_name": "det1",
                                              "user_id": "root"})
    assert r.status_code == 200, r.text
    events = alice.get("/api/events", params={"since": "0"}).json()["events"]
    assert [(e["action"], e["actor"], e["lock"]["user_id"]) for e in events] == [
        ("acquired", "alice", "alice"), ("released", "alice", "alice")]


def test_the_deprecated_query_release_is_recorded_as_the_key_principal(secure, as_) -> None:
    alice = as_("alice")
    key = alice.post("/api/lock/request", json=lock_body("det1")).json()["lock_key"]
    r = alice.post("/api/lock/release", params={"lock_key": key, "device_name": "det1",
                                                 "user_id": "mallory"})
    assert r.status_code == 200, r.text
    assert alice.get("/api/events").json()["events"][-1]["actor"] == "alice"


def test_someone_elses_lock_needs_the_same_principal_or_admin(secure, as_) -> None:
    alice, bob, root = as_("alice"), as_("bob"), as_("root")
    key = alice.post("/api/lock/request", json=lock_body(["det1", "det2"])).json()["lock_key"]
    before = root.get("/api/locks/status").json()

    # bob has alice's key, but it is not his lock.
    attempts = {
        "release one": ("/api/lock/release", {"lock_key": key, "device_name": "det1"}),
        "release all": ("/api/lock/release", {"lock_key": key}),
        "renew": ("/api/lock/renew", {"lock_key": key, "timeout": 30}),
        "add a device": ("/api/lock/request", {**lock_body("det3"), "lock_key": key}),
    }
    for what, (path, body) in attempts.items():
        r = bob.post(path, json=body)
        assert r.status_code == 403, (what, r.text)
        assert "'alice'" in r.json()["message"], r.json()["message"]
    after = root.get("/api/locks/status").json()
    assert after["locks"] == before["locks"] and after["last_event_id"] == before["last_event_id"]

    # Without the key, nobody releases it, admin or not.
    r = root.post("/api/lock/release", json={"lock_key": "guess", "device_name": "det1"})
    assert r.status_code == 403, r.text
    # An admin with the key may.
    r = root.post("/api/lock/renew", json={"lock_key": key, "timeout": 30})
    assert r.status_code == 200, r.text
    r = root.post("/api/lock/release", json={"lock_key": key})
    assert r.status_code == 200, r.text
    events = root.get("/api/events").json()["events"]
    assert [(e["action"], e["actor"]) for e in events[-4:]] == [
        ("renewed", "root"), ("renewed", "root"), ("released", "root"), ("released", "root")]
    assert root.get("/api/locks/status").json()["locks"] == []


def test_an_owner_upgrades_its_own_lock_only_with_the_role(secure, as_) -> None:
    alice = as_("alice")
    key = alice.post("/api/lock/request", json=lock_body("det1")).json()["lock_key"]
    r = alice.post("/api/lock/request", json={**lock_body("det1", "MAINTENANCE"), "lock_key": key})
    assert r.status_code == 403, r.text
    r = alice.post("/api/lock/request", json={**lock_body("det2"), "lock_key": key})
    assert r.status_code == 200, r.text
    assert {lk["device_name"] for lk in r.json()["locks"]} == {"det2"}


def test_force_release_needs_admin(secure, as_) -> None:
    alice, root = as_("alice"), as_("root")
    assert alice.post("/api/lock/request", json=lock_body("det1")).status_code == 200
    for who in ("reader", "alice", "bob", "qs"):
        r = as_(who).post("/api/lock/force-release", json={"device_name": "det1"})
        assert r.status_code == 403, (who, r.text)
    assert root.get("/api/locks/device/det1").json()["locked"] is True
    r = root.post("/api/lock/force-release", json={"device_name": "det1", "reason": "stuck"})
    assert r.status_code == 200, r.text
    event = root.get("/api/events").json()["events"][-1]
    assert (event["action"], event["actor"], event["lock"]["user_id"]) == (
        "force_released", "root", "alice")


def test_openapi_declares_the_key_and_its_answers(secure, as_, keys) -> None:
    doc = as_("reader").get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "in": "header", "name": "Authorization",
        "description": doc["components"]["securitySchemes"]["ApiKey"]["description"]}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path in HEALTH:
                assert "security" not in op and "401" not in op["responses"], (method, path)
            else:
                assert op["security"] == [{"ApiKey": []}], (method, path)
                assert "401" in op["responses"], (method, path)
    for path in ("/api/lock/request", "/api/lock/release", "/api/lock/renew",
                 "/api/lock/force-release"):
        assert "403" in doc["paths"][path]["post"]["responses"], path
    assert auth(keys["reader"])  # the helper the fuzz test uses


def test_without_keys_openapi_declares_no_security(live_service) -> None:
    doc = httpx.get(live_service.url + "/openapi.json").json()
    assert "securitySchemes" not in doc.get("components", {})
    assert not [(p, m) for p, item in doc["paths"].items() for m, op in item.items()
                if "security" in op or "401" in op.get("responses", {})]
    # And the service answers without a key, as before.
    r = httpx.post(live_service.url + "/api/lock/request", json=lock_body("det1", user="carol"))
    assert r.status_code == 200 and r.json()["locks"][0]["user_id"] == "carol"
