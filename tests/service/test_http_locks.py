"""The lock rules, as a client sees them through raw HTTP against a real server (every store)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_grant_returns_key_token_and_lease(api) -> None:
    before = datetime.now(timezone.utc)
    body = await api.grant("det1", "MANUAL_OPERATOR", "alice", timeout=60, reason="calibration")
    assert body["lock_key"] and body["token"] >= 1
    assert before + timedelta(seconds=59) < ts(body["expires_at"]) < before + timedelta(seconds=62)
    [lock] = body["locks"]
    assert lock["device_name"] == "det1" and lock["user_id"] == "alice"
    assert lock["lock_type"] == "MANUAL_OPERATOR" and lock["priority"] == 2
    assert lock["reason"] == "calibration" and lock["state"] == "active"
    assert lock["token"] == body["token"]
    status = await api.device("det1")
    assert status["locked"] is True and status["lock"]["user_id"] == "alice"
    all_locks = await api.status()
    assert all_locks["total_count"] == 1 and all_locks["last_event_id"]


async def test_people_may_lock_without_a_lease(api) -> None:
    body = await api.grant("det1", "MAINTENANCE", "staff", timeout=None)
    assert body["expires_at"] is None and body["locks"][0]["expires_at"] is None


async def test_conflict_is_409_with_the_holders_public_record(api) -> None:
    await api.grant("det1", "MANUAL_OPERATOR", "alice", reason="alignment")
    before = await api.status()
    for lock_type in ("MANUAL_OPERATOR", "QUEUE_QUEUED"):  # equal, then lower priority
        r = await api.lock("det1", lock_type, "bob")
        assert r.status_code == 409
        body = r.json()
        assert body["success"] is False
        assert "alice" in body["message"] and "alignment" in body["message"]
        [holder] = body["conflicts"]
        assert holder["user_id"] == "alice" and holder["lock_type"] == "MANUAL_OPERATOR"
        assert holder["reason"] == "alignment" and holder["acquired_at"] and holder["expires_at"]
        assert "lock_key" not in holder and "lock_key" not in r.text
    after = await api.status()
    assert after["locks"] == before["locks"] and after["last_event_id"] == before["last_event_id"]


async def test_preempt_then_restore_with_the_same_key_and_a_new_token(api) -> None:
    alice = await api.grant("det1", "MANUAL_OPERATOR", "alice", reason="alignment")
    staff = await api.grant("det1", "MAINTENANCE", "staff", reason="vacuum leak")
    assert staff["token"] > alice["token"]
    status = await api.device("det1")
    assert status["lock"]["user_id"] == "staff"
    [waiting] = status["preempted"]
    assert waiting["user_id"] == "alice" and waiting["state"] == "preempted"
    assert waiting["preempted_by"]["user_id"] == "staff"
    assert waiting["preempted_by"]["lock_type"] == "MAINTENANCE"

    # A preempted lock still refuses equal and lower priorities: a restore displaces nobody.
    r = await api.lock("det1", "MANUAL_OPERATOR", "carol")
    assert r.status_code == 409

    r = await api.release(staff["lock_key"], "det1")
    assert r.status_code == 200
    status = await api.device("det1")
    assert status["locked"] and status["lock"]["user_id"] == "alice"
    assert status["lock"]["state"] == "active" and status["preempted"] == []
    assert status["lock"]["token"] > staff["token"]  # a restore is a grant: fresh token
    # The restored lock is still alice's key.
    r = await api.release(alice["lock_key"], "det1")
    assert r.status_code == 200, r.text
    assert (await api.status())["locks"] == []


async def test_equal_priority_never_steals(api) -> None:
    await api.grant("m1", "QUEUE_EXECUTING", "queue", timeout=60)
    r = await api.lock("m1", "QUEUE_EXECUTING", "other-queue", timeout=60)
    assert r.status_code == 409
    assert await api.held() == {"m1": [("queue", "QUEUE_EXECUTING", "active")]}


async def test_multi_device_request_is_all_or_nothing(api) -> None:
    alice = await api.grant("m2", "MANUAL_OPERATOR", "alice")
    r = await api.lock(["m1", "m2", "m3"], "MANUAL_OPERATOR", "bob")
    assert r.status_code == 409
    assert [c["device_name"] for c in r.json()["conflicts"]] == ["m2"]
    assert await api.held() == {"m2": [("alice", "MANUAL_OPERATOR", "active")]}

    assert (await api.release(alice["lock_key"])).status_code == 200
    bob = await api.grant(["m1", "m2", "m3"], "MANUAL_OPERATOR", "bob")
    assert sorted(lk["device_name"] for lk in bob["locks"]) == ["m1", "m2", "m3"]
    assert {lk["token"] for lk in bob["locks"]} == {bob["token"]}
    # Releasing by key alone releases every device of the key.
    r = await api.release(bob["lock_key"])
    assert r.status_code == 200
    assert sorted(lk["device_name"] for lk in r.json()["released"]) == ["m1", "m2", "m3"]
    assert (await api.status())["locks"] == []


async def test_multi_device_preemption_is_atomic_too(api) -> None:
    await api.grant("m1", "MANUAL_OPERATOR", "alice")
    await api.grant("m2", "MAINTENANCE", "staff")
    # QUEUE_EXECUTING outranks alice on m1 but not staff on m2: nothing may change.
    r = await api.lock(["m1", "m2"], "QUEUE_EXECUTING", "queue", timeout=60)
    assert r.status_code == 409
    assert await api.held() == {"m1": [("alice", "MANUAL_OPERATOR", "active")],
                                "m2": [("staff", "MAINTENANCE", "active")]}


async def test_hierarchy_of_dotted_names(api) -> None:
    parent = await api.grant("det1", "MANUAL_OPERATOR", "alice")
    r = await api.lock("det1.cam", "MANUAL_OPERATOR", "bob")
    assert r.status_code == 409 and r.json()["conflicts"][0]["device_name"] == "det1"
    # The component reports locked, by the ancestor's lock.
    cam = await api.device("det1.cam")
    assert cam["locked"] is True and cam["lock"]["device_name"] == "det1"
    await api.release(parent["lock_key"])

    cam_lock = await api.grant("det1.cam", "MANUAL_OPERATOR", "bob")
    await api.grant("det1.stats", "MANUAL_OPERATOR", "carol")  # siblings do not overlap
    r = await api.lock("det1", "MANUAL_OPERATOR", "alice")
    assert r.status_code == 409
    assert {c["device_name"] for c in r.json()["conflicts"]} == {"det1.cam", "det1.stats"}
    top = await api.device("det1")
    assert top["locked"] is False and top["lock"] is None
    assert sorted(c["device_name"] for c in top["component_locks"]) == ["det1.cam", "det1.stats"]
    # A higher priority on the parent preempts both components, and hands them back.
    staff = await api.grant("det1", "MAINTENANCE", "staff")
    held = await api.held()
    assert held["det1.cam"] == [("bob", "MANUAL_OPERATOR", "preempted")]
    assert held["det1.stats"] == [("carol", "MANUAL_OPERATOR", "preempted")]
    await api.release(staff["lock_key"])
    held = await api.held()
    assert held == {"det1.cam": [("bob", "MANUAL_OPERATOR", "active")],
                    "det1.stats": [("carol", "MANUAL_OPERATOR", "active")]}
    assert (await api.release(cam_lock["lock_key"], "det1.cam")).status_code == 200


async def test_renew_extends_the_lease(api) -> None:
    body = await api.grant(["m1", "m2"], "QUEUE_EXECUTING", "queue", timeout=5)
    r = await api.client.post("/api/lock/renew", json={"lock_key": body["lock_key"], "timeout": 600})
    assert r.status_code == 200, r.text
    renewed = r.json()
    assert ts(renewed["expires_at"]) > ts(body["expires_at"]) + timedelta(seconds=500)
    assert sorted(lk["device_name"] for lk in renewed["locks"]) == ["m1", "m2"]
    for lk in (await api.status())["locks"]:
        assert ts(lk["expires_at"]) == ts(renewed["expires_at"])
    # Programs keep a lease; an unknown key holds nothing.
    r = await api.client.post("/api/lock/renew", json={"lock_key": body["lock_key"], "timeout": None})
    assert r.status_code == 422 and "timeout" in r.json()["message"]
    r = await api.client.post("/api/lock/renew", json={"lock_key": "no-such-key", "timeout": 10})
    assert r.status_code == 404


async def test_upgrade_by_key_from_queued_to_executing(api) -> None:
    queued = await api.grant("det1", "QUEUE_QUEUED", "queue", timeout=60, plan_uid="p1")
    up = await api.grant("det1", "QUEUE_EXECUTING", "queue", timeout=60,
                         lock_key=queued["lock_key"])
    assert up["lock_key"] == queued["lock_key"] and up["token"] > queued["token"]
    assert await api.held() == {"det1": [("queue", "QUEUE_EXECUTING", "active")]}
    # Now MANUAL_OPERATOR no longer outranks it.
    assert (await api.lock("det1", "MANUAL_OPERATOR", "alice")).status_code == 409
    # A key that holds nothing cannot be presented.
    r = await api.lock("det2", "QUEUE_EXECUTING", "queue", timeout=60, lock_key="forged-key")
    assert r.status_code == 404


async def test_executing_lock_consumes_its_own_plans_reservations(api) -> None:
    await api.grant(["m1", "det1"], "QUEUE_QUEUED", "queue", timeout=60, plan_uid="plan-A")
    await api.grant("m2", "QUEUE_QUEUED", "queue", timeout=60, plan_uid="plan-B")
    run = await api.grant(["m1", "det1", "m2"], "QUEUE_EXECUTING", "queue", timeout=60,
                          plan_uid="plan-A")
    held = await api.held()
    assert held["m1"] == [("queue", "QUEUE_EXECUTING", "active")]
    assert held["det1"] == [("queue", "QUEUE_EXECUTING", "active")]
    # Another plan's reservation is preempted, not consumed.
    assert sorted(held["m2"]) == [("queue", "QUEUE_EXECUTING", "active"),
                                  ("queue", "QUEUE_QUEUED", "preempted")]
    actions = {(e["action"], e["device_name"], e["lock"]["lock_type"])
               for e in await api.events()}
    assert ("consumed", "m1", "QUEUE_QUEUED") in actions
    assert ("consumed", "det1", "QUEUE_QUEUED") in actions
    assert ("preempted", "m2", "QUEUE_QUEUED") in actions
    await api.release(run["lock_key"])
    # The consumed reservations are gone for good; plan-B's comes back.
    assert await api.held() == {"m2": [("queue", "QUEUE_QUEUED", "active")]}


async def test_waiting_request_is_granted_when_the_holder_releases(api) -> None:
    alice = await api.grant("det1", "MANUAL_OPERATOR", "alice")
    waiting = asyncio.create_task(api.lock("det1", "MANUAL_OPERATOR", "bob", wait=20))
    # Observe that bob is queued (the device is still alice's), then release.
    await asyncio.sleep(0.2)  # let bob's request reach the queue
    assert not waiting.done()
    r = await api.release(alice["lock_key"], "det1")
    assert r.status_code == 200
    got = await asyncio.wait_for(waiting, 10)
    assert got.status_code == 200, got.text
    assert await api.held() == {"det1": [("bob", "MANUAL_OPERATOR", "active")]}


async def test_waiting_request_is_refused_when_the_wait_runs_out(api) -> None:
    await api.grant("det1", "MANUAL_OPERATOR", "alice")
    r = await api.lock("det1", "MANUAL_OPERATOR", "bob", wait=0.3)
    assert r.status_code == 409
    assert "waited" in r.json()["message"] and r.json()["conflicts"][0]["user_id"] == "alice"
    assert await api.held() == {"det1": [("alice", "MANUAL_OPERATOR", "active")]}


async def test_waiters_are_served_by_priority(api) -> None:
    alice = await api.grant("det1", "MANUAL_OPERATOR", "alice")
    low = asyncio.create_task(api.lock("det1", "QUEUE_QUEUED", "queue", timeout=60, wait=20))
    await asyncio.sleep(0.2)  # queued before the release
    high = asyncio.create_task(api.lock("det1", "MANUAL_OPERATOR", "bob", wait=20))
    await asyncio.sleep(0.2)  # queued before the release
    await api.release(alice["lock_key"])
    got = await asyncio.wait_for(high, 10)
    assert got.status_code == 200, got.text
    # The lower-priority waiter stays queued behind bob until its wait runs out or bob leaves.
    assert not low.done()
    await api.release(got.json()["lock_key"])
    assert (await asyncio.wait_for(low, 10)).status_code == 200


async def test_wrong_key_is_403_and_changes_nothing(api) -> None:
    await api.grant("det1", "MANUAL_OPERATOR", "alice")
    bob = await api.grant("det2", "MANUAL_OPERATOR", "bob")
    before = await api.status()
    r = await api.release(bob["lock_key"], "det1", "bob")
    assert r.status_code == 403
    assert "alice" in r.json()["message"] and bob["lock_key"] not in r.text
    after = await api.status()
    assert after["locks"] == before["locks"] and after["last_event_id"] == before["last_event_id"]


async def test_release_of_nothing_is_404(api) -> None:
    alice = await api.grant("det1", "MANUAL_OPERATOR", "alice")
    assert (await api.release("never-issued")).status_code == 404
    assert (await api.release("never-issued", "det9")).status_code == 404
    assert (await api.release(alice["lock_key"], "det9")).status_code == 404
    assert (await api.release(alice["lock_key"], "det1")).status_code == 200
    assert (await api.release(alice["lock_key"], "det1")).status_code == 404


async def test_release_query_parameter_form_still_works(api) -> None:
    alice = await api.grant(["det1", "det2"], "MANUAL_OPERATOR", "alice")
    params = {"device_name": "det1", "lock_key": alice["lock_key"], "user_id": "alice"}
    r = await api.client.post("/api/lock/release", params=params)
    assert r.status_code == 200, r.text
    assert [lk["device_name"] for lk in r.json()["released"]] == ["det1"]
    r = await api.client.post("/api/lock/release", params={"lock_key": "wrong", "device_name": "det2"})
    assert r.status_code == 403
    r = await api.client.post("/api/lock/release", params={"device_name": "det2"})
    assert r.status_code == 422 and r.json()["message"].startswith("lock_key")
    assert await api.held() == {"det2": [("alice", "MANUAL_OPERATOR", "active")]}


async def test_force_release_removes_every_lock_on_the_name(api) -> None:
    await api.grant("det1", "MANUAL_OPERATOR", "alice")
    await api.grant("det1", "MAINTENANCE", "staff")
    cam = await api.grant("det2.cam", "MANUAL_OPERATOR", "bob")
    r = await api.client.post("/api/lock/force-release",
                              json={"device_name": "det1", "reason": "stuck session"})
    assert r.status_code == 200, r.text
    assert sorted(lk["user_id"] for lk in r.json()["released"]) == ["alice", "staff"]
    assert await api.held() == {"det2.cam": [("bob", "MANUAL_OPERATOR", "active")]}
    forced = [e for e in await api.events() if e["action"] == "force_released"]
    assert sorted(e["lock"]["user_id"] for e in forced) == ["alice", "staff"]
    r = await api.client.post("/api/lock/force-release", json={"device_name": "det1"})
    assert r.status_code == 404
    # Exactly that name: a lock on a component is untouched by the parent's force-release.
    r = await api.client.post("/api/lock/force-release", json={"device_name": "det2"})
    assert r.status_code == 404
    assert (await api.release(cam["lock_key"])).status_code == 200


async def test_force_release_restores_what_waited_on_overlapping_names(api) -> None:
    await api.grant("det1.cam", "MANUAL_OPERATOR", "alice")
    await api.grant("det1", "MAINTENANCE", "staff")
    assert (await api.held())["det1.cam"] == [("alice", "MANUAL_OPERATOR", "preempted")]
    r = await api.client.post("/api/lock/force-release", json={"device_name": "det1"})
    assert r.status_code == 200
    assert await api.held() == {"det1.cam": [("alice", "MANUAL_OPERATOR", "active")]}


async def test_fencing_tokens_only_increase(api) -> None:
    tokens = []
    for i in range(5):
        body = await api.grant(f"dev{i}", "MANUAL_OPERATOR", "alice")
        tokens.append(body["token"])
        await api.release(body["lock_key"])
    assert tokens == sorted(tokens) and len(set(tokens)) == 5


async def test_a_preempted_lock_can_be_released_and_renewed_by_its_key(api) -> None:
    alice = await api.grant(["det1", "det2"], "MANUAL_OPERATOR", "alice", timeout=60)
    staff = await api.grant("det1", "MAINTENANCE", "staff", timeout=None)
    r = await api.client.post("/api/lock/renew", json={"lock_key": alice["lock_key"], "timeout": 90})
    assert r.status_code == 200
    assert {lk["device_name"]: lk["state"] for lk in r.json()["locks"]} == {
        "det1": "preempted", "det2": "active"}
    r = await api.release(alice["lock_key"], "det1")
    assert r.status_code == 200 and r.json()["released"][0]["state"] == "preempted"
    await api.release(staff["lock_key"])
    # Nothing comes back on det1: the preempted lock was released meanwhile.
    assert await api.held() == {"det2": [("alice", "MANUAL_OPERATOR", "active")]}
    assert "restored" not in [e["action"] for e in await api.events()]
