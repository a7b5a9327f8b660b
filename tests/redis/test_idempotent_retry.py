"""A service killed between commit and answer leaves no orphaned lock: the client sends the
request again with its Idempotency-Key (to the restarted service, or another replica) and gets
the grant that was committed, same lock_key and token."""

from __future__ import annotations

import secrets

import httpx
import pytest

pytestmark = [pytest.mark.redis]


async def test_a_retry_after_kill_9_finds_the_committed_grant(redis_server, spawn_service) -> None:
    body = {"device_names": ["m1", "m2"], "lock_type": "QUEUE_EXECUTING", "user_id": "qs",
            "timeout": 60, "plan_uid": "item-1"}
    key = {"Idempotency-Key": secrets.token_urlsafe(24)}
    first = spawn_service(redis_server.url)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{first.url}/api/lock/request", json=body, headers=key)
        assert r.status_code == 200, r.text
        granted = r.json()
        first.kill9()  # as if it died before its answer left
        second = spawn_service(redis_server.url)
        r = await http.post(f"{second.url}/api/lock/request", json=body, headers=key)
        assert r.status_code == 200, r.text
        assert r.json()["lock_key"] == granted["lock_key"]
        assert r.json()["token"] == granted["token"]
        locks = (await http.get(f"{second.url}/api/locks/status")).json()["locks"]
        assert sorted(lk["device_name"] for lk in locks) == ["m1", "m2"]
        # The holder can release what it now knows it holds: nothing is left behind.
        r = await http.post(f"{second.url}/api/lock/release",
                            json={"lock_key": granted["lock_key"]})
        assert r.status_code == 200
        assert (await http.get(f"{second.url}/api/locks/status")).json()["total_count"] == 0
