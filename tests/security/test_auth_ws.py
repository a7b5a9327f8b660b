"""The WebSocket handshake needs a valid key when authentication is on: refused with 401 before
any frame is sent; any key (every role can read) gets the live stream."""

from __future__ import annotations

import json

import httpx
import pytest
from security_helpers import auth, lock_body
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "ApiKey not-a-key"}, {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
], ids=["no key", "unknown key", "wrong scheme"])
def test_handshake_without_a_valid_key_is_refused(secure, headers) -> None:
    with pytest.raises(InvalidStatus) as info:
        with connect(secure.ws_url, additional_headers=headers, open_timeout=10):
            pass  # pragma: no cover - the handshake must fail
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "ApiKey"
    body = json.loads(response.body)
    assert body["success"] is False and "key" in body["message"]
    assert b"not-a-key" not in response.body


def test_a_refused_handshake_also_refuses_resuming(secure) -> None:
    with pytest.raises(InvalidStatus) as info:
        with connect(secure.ws_url + "?since=0", open_timeout=10):
            pass  # pragma: no cover
    assert info.value.response.status_code == 401


@pytest.mark.parametrize("who", ["reader", "alice", "qs", "root"])
def test_every_role_can_follow_the_stream(secure, keys, who) -> None:
    with connect(secure.ws_url, additional_headers=auth(keys[who]), open_timeout=10) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "initial_status"
        r = httpx.post(secure.url + "/api/lock/request", headers=auth(keys["alice"]),
                       json=lock_body(f"det.{who}"))
        assert r.status_code == 200, r.text
        frame = json.loads(ws.recv(timeout=10))
        assert (frame["action"], frame["actor"], frame["lock"]["user_id"]) == (
            "acquired", "alice", "alice")
        assert r.json()["lock_key"] not in json.dumps(frame)
