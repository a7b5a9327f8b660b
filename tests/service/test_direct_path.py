"""The lock operations' direct path (``service/direct.py``) answers exactly as FastAPI does.

Ordinary JSON requests to request, release and renew are answered by the direct path; anything
else (a query string, another content type, a body that does not validate) goes through
FastAPI. These tests send the same operation both ways and compare what a client sees.
"""

from __future__ import annotations

import json
from typing import Any

#: Differs from one grant to the next whichever way it was answered.
VOLATILE = {"lock_key", "token", "acquired_at", "expires_at", "message"}


def shape(body: Any) -> Any:
    """The body with the values that differ between two grants blanked out."""
    if isinstance(body, dict):
        return {k: ("*" if k in VOLATILE else shape(v)) for k, v in body.items()}
    if isinstance(body, list):
        return [shape(v) for v in body]
    return body


def named(body: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``body`` with the device name ``old`` written as ``new`` (to compare two grants)."""
    result: dict[str, Any] = json.loads(json.dumps(body).replace(f'"{old}"', f'"{new}"'))
    return result


async def test_request_release_and_renew_answer_the_same_both_ways(api) -> None:
    c = api.client
    lock = {"lock_type": "QUEUE_EXECUTING", "user_id": "qs", "timeout": 60, "reason": "scan",
            "plan_uid": "p-1"}
    direct = await c.post("/api/lock/request", json={"device_name": "m1", **lock})
    # An unknown query parameter is ignored by the route, but sends the request through FastAPI.
    routed = await c.post("/api/lock/request?via=fastapi", json={"device_name": "m2", **lock})
    assert direct.status_code == routed.status_code == 200
    assert direct.headers["content-type"] == routed.headers["content-type"] == "application/json"
    assert shape(named(direct.json(), "m1", "m2")) == shape(routed.json())
    assert direct.json()["message"] == "Lock granted on 'm1' (QUEUE_EXECUTING)"

    key1, key2 = direct.json()["lock_key"], routed.json()["lock_key"]
    renew1 = await c.post("/api/lock/renew", json={"lock_key": key1, "timeout": 120})
    renew2 = await c.post("/api/lock/renew?via=fastapi", json={"lock_key": key2, "timeout": 120})
    assert renew1.status_code == renew2.status_code == 200
    assert shape(named(renew1.json(), "m1", "m2")) == shape(renew2.json())

    rel1 = await c.post("/api/lock/release", json={"lock_key": key1})
    rel2 = await c.post("/api/lock/release?via=fastapi", json={"lock_key": key2})
    assert rel1.status_code == rel2.status_code == 200
    assert shape(named(rel1.json(), "m1", "m2")) == shape(rel2.json())
    assert rel1.json()["message"] == "Released 'm1'" and rel2.json()["message"] == "Released 'm2'"
    assert (await api.status())["locks"] == []


async def test_errors_answer_the_same_both_ways(api) -> None:
    c = api.client
    await api.grant("det1", "MAINTENANCE", "maint", reason="alignment")
    body = {"device_name": "det1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"}
    direct = await c.post("/api/lock/request", json=body)
    routed = await c.post("/api/lock/request?via=fastapi", json=body)
    assert direct.status_code == routed.status_code == 409
    assert direct.json() == routed.json()
    assert direct.json()["conflicts"][0]["user_id"] == "maint"

    for path, payload in (("/api/lock/release", {"lock_key": "nope"}),
                          ("/api/lock/renew", {"lock_key": "nope", "timeout": 5})):
        direct = await c.post(path, json=payload)
        routed = await c.post(path + "?via=fastapi", json=payload)
        assert direct.status_code == routed.status_code == 404, (path, direct.text)
        assert direct.json() == routed.json()


async def test_requests_the_direct_path_declines_still_get_answers(api) -> None:
    c = api.client
    ok = b'{"device_name": "det2", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"}'
    # A byte-order mark: pydantic's JSON parser refuses it, FastAPI's json.loads accepts it.
    r = await c.post("/api/lock/request", content=b"\xef\xbb\xbf" + ok,
                     headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["locks"][0]["device_name"] == "det2"
    # Mixed-case media type with a charset: still JSON, answered.
    r = await c.post("/api/lock/request", content=ok.replace(b"det2", b"det3"),
                     headers={"content-type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 200, r.text
    # Not declared as JSON: FastAPI refuses it, and nothing is locked.
    r = await c.post("/api/lock/request", content=ok.replace(b"det2", b"det4"),
                     headers={"content-type": "text/plain"})
    assert r.status_code == 422, r.text
    assert r.json()["success"] is False
    assert "det4" not in await api.held()
