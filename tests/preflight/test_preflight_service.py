"""``POST /api/preflight`` through a live service whose dry runs run in a real child process
loading a real profile collection: the devices a plan will touch (also those of the startup
namespace it takes no argument for), the locks in their way, and plans a dry run cannot finish
(adaptive, hanging, raising, crashing) answered without harm to the service."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from preflight_collection import EXAMPLE as EXAMPLE_COLLECTION

ISSUE_ITEM = {"name": "scan", "args": [["det1"], "motor1", -1, 1, 5], "kwargs": {}}


async def preflight(api: httpx.AsyncClient, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    r = await api.post("/api/preflight", json={"item": {"name": name, "args": list(args),
                                                        "kwargs": kwargs}})
    assert r.status_code == 200, r.text
    return dict(r.json())


def sources(answer: dict[str, Any]) -> dict[str, str]:
    return {d["device_name"]: d["source"] for d in answer["devices"]}


async def lock(api: httpx.AsyncClient, device: str, lock_type: str, user: str,
               reason: str | None = None) -> str:
    r = await api.post("/api/lock/request", json={
        "device_name": device, "lock_type": lock_type, "user_id": user, "reason": reason,
        "timeout": 60})
    assert r.status_code == 200, r.text
    return str(r.json()["lock_key"])


async def release(api: httpx.AsyncClient, key: str) -> None:
    r = await api.post("/api/lock/release", json={"lock_key": key})
    assert r.status_code == 200, r.text


async def test_a_startup_namespace_device_is_predicted_and_maintenance_on_it_blocks(api_of):
    api = api_of()
    r = await api.post("/api/preflight", json={"item": ISSUE_ITEM})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert sources(answer) == {"det1": "argument", "motor1": "argument"}
    assert answer["complete"] is True and answer["reason"] is None
    assert answer["conflicts"] == [] and answer["can_start"] is True

    # park_and_count names only the detector; it moves motor2 of the startup code.
    answer = await preflight(api, "park_and_count", ["det1"])
    assert sources(answer) == {"det1": "argument", "motor2": "dry_run"}
    assert "set" in {d["device_name"]: d for d in answer["devices"]}["motor2"]["commands"]
    assert answer["complete"] is True and answer["can_start"] is True

    key = await lock(api, "motor2", "MAINTENANCE", "bob", reason="bake-out of the axis")
    operator = await lock(api, "det1", "MANUAL_OPERATOR", "carol")  # preempted by the plan
    answer = await preflight(api, "park_and_count", ["det1"])
    assert answer["can_start"] is False
    assert len(answer["conflicts"]) == 1
    conflict = answer["conflicts"][0]
    assert conflict["device_name"] == "motor2"
    assert conflict["lock"]["user_id"] == "bob"
    assert conflict["lock"]["lock_type"] == "MAINTENANCE"
    assert conflict["lock"]["reason"] == "bake-out of the axis"
    assert "lock_key" not in conflict["lock"]

    await release(api, key)
    answer = await preflight(api, "park_and_count", ["det1"])
    assert answer["conflicts"] == [] and answer["can_start"] is True
    await release(api, operator)

    # Items checked with their uid are listed for the dashboard, their conflicts as of now.
    r = await api.post("/api/preflight", json={"item": {
        "name": "park_and_count", "args": [["det1"]], "item_uid": "item-1", "user": "ann"}})
    assert r.status_code == 200, r.text
    listed = (await api.get("/api/preflight/items")).json()["items"]
    assert [(i["item_uid"], i["plan"], i["can_start"]) for i in listed] == [
        ("item-1", "park_and_count", True)]
    key = await lock(api, "motor2", "MAINTENANCE", "bob", reason="bake-out of the axis")
    listed = (await api.get("/api/preflight/items")).json()["items"]
    assert listed[0]["can_start"] is False
    assert listed[0]["conflicts"][0]["lock"]["user_id"] == "bob"
    await release(api, key)

    # An equal-priority holder (another plan running) is in the way too; so is a lock on a
    # component of a predicted device (stage_raster moves stage.coarse.x from the namespace).
    running = await lock(api, "det1", "QUEUE_EXECUTING", "queue_server", reason="plan 1")
    part = await lock(api, "stage.coarse.x", "MAINTENANCE", "bob", reason="encoder swap")
    answer = await preflight(api, "stage_raster", ["det1"], x_num=2, y_num=2)
    assert sources(answer) == {"det1": "argument", "stage": "dry_run"}
    held = {(c["device_name"], c["lock"]["device_name"], c["lock"]["user_id"])
            for c in answer["conflicts"]}
    assert held == {("det1", "det1", "queue_server"), ("stage", "stage.coarse.x", "bob")}
    assert answer["can_start"] is False
    await release(api, running)
    await release(api, part)


async def test_adaptive_plans_are_incomplete_and_keep_their_argument_devices(api_of,
                                                                            test_collection):
    api = api_of(test_collection)
    answer = await preflight(api, "adaptive_count", ["det1"], "motor1")
    assert answer["complete"] is False
    assert answer["incomplete"] == "needs_readings"
    assert "adaptive" in answer["reason"] and "det1" in answer["reason"]
    assert sources(answer) == {"det1": "argument", "motor1": "argument"}

    answer = await preflight(api, "adaptive_rd", ["det2"])
    assert answer["complete"] is False and answer["incomplete"] == "needs_readings"
    assert "det2" in answer["reason"] and "bps.rd" in answer["reason"]
    assert sources(answer)["det2"] == "argument"


async def test_plans_that_hang_raise_or_crash_do_not_harm_the_service(api_of, test_collection):
    api = api_of(test_collection, preflight_timeout=1.0)
    answer = await preflight(api, "raising_plan", ["det1"])
    assert answer["complete"] is False and answer["incomplete"] == "exception"
    assert "RuntimeError: the beam is down" in answer["reason"]
    assert answer["messages"] >= 2  # the move of motor1 before it raised
    assert sources(answer) == {"det1": "argument", "motor1": "dry_run"}
    # A plan that reads its standard input gets end-of-file, not the next request.
    answer = await preflight(api, "asking_plan", ["det1"])
    assert answer["incomplete"] == "exception" and "EOFError" in answer["reason"]

    # A dry run that hangs is stopped at its time limit; the same child serves the next one.
    answer = await preflight(api, "hanging_plan", ["det2"])
    assert answer["complete"] is False and answer["incomplete"] == "time_limit"
    assert "time limit of 1 s" in answer["reason"]
    assert sources(answer) == {"det2": "argument", "motor1": "dry_run"}
    assert (await preflight(api, "count", ["det1"]))["complete"] is True

    # One that cannot be interrupted is killed (after the limit and a grace); meanwhile the
    # service answers lock requests. One that ends its process ends only that process.
    stubborn = asyncio.create_task(preflight(api, "stubborn_plan", ["det2"]))
    await asyncio.sleep(0.3)
    key = await lock(api, "det2", "MANUAL_OPERATOR", "carol")
    assert (await api.get("/api/locks/status")).json()["total_count"] == 1
    assert not stubborn.done()  # the service answered while the dry run hung
    answer = await stubborn
    assert answer["complete"] is False and answer["incomplete"] == "time_limit"
    assert "killed" in answer["reason"]
    assert sources(answer) == {"det2": "argument"}
    await release(api, key)
    answer = await preflight(api, "crashing_plan", ["det1"])
    assert answer["complete"] is False and answer["incomplete"] == "exception"
    assert "exit code 3" in answer["reason"]
    assert sources(answer) == {"det1": "argument"}
    answer = await preflight(api, "park_and_count", ["det1"])
    assert answer["complete"] is True and sources(answer)["motor2"] == "dry_run"
    assert (await api.get("/api/health/live")).status_code == 200


async def test_refusals_name_the_problem_and_change_nothing(api_of):
    api = api_of()
    cases = [
        ({"name": "scna", "args": [["det1"], "motor1", -1, 1, 5]}, "scna"),
        ({"name": "count", "args": [["det1"]], "kwargs": {"nonsense": 1}}, "nonsense"),
        ({"name": "count", "args": [["det1"]], "item_type": "instruction"}, "item_type"),
    ]
    for item, named in cases:
        r = await api.post("/api/preflight", json={"item": item})
        assert r.status_code == 422, r.text
        assert named in r.json()["message"]
    r = await api.post("/api/preflight", json={"name": "count"})
    assert r.status_code == 422 and "item" in r.json()["message"]
    assert (await api.get("/api/locks/status")).json()["locks"] == []
    r = await api.post("/api/preflight", json={"item": ISSUE_ITEM})
    assert r.status_code == 200, r.text  # the child is fine after refusals

    bare = api_of(None)
    r = await bare.post("/api/preflight", json={"item": ISSUE_ITEM})
    assert r.status_code == 409
    assert "--profile-collection" in r.json()["message"]


async def test_with_api_keys_preflight_needs_a_key_and_the_read_role_suffices(api_of,
                                                                             tmp_path: Path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"api_keys": [{
        "principal": "viewer", "roles": ["read"],
        "key_sha256": hashlib.sha256(b"read-key").hexdigest()}]}))
    api = api_of(api_keys=str(keys))
    r = await api.post("/api/preflight", json={"item": ISSUE_ITEM})
    assert r.status_code == 401
    r = await api.post("/api/preflight", json={"item": ISSUE_ITEM},
                       headers={"Authorization": "ApiKey read-key"})
    assert r.status_code == 200, r.text
    assert sources(r.json()) == {"det1": "argument", "motor1": "argument"}


async def test_a_reloaded_collection_is_dry_run_with_its_new_plans(api_of, tmp_path: Path):
    import shutil

    collection = tmp_path / "collection"
    shutil.copytree(EXAMPLE_COLLECTION / "startup", collection / "startup")
    api = api_of(collection)
    r = await api.post("/api/preflight", json={"item": {"name": "home_motor1", "args": []}})
    assert r.status_code == 422 and "home_motor1" in r.json()["message"]

    (collection / "startup" / "20-more-plans.py").write_text(
        "def home_motor1():\n"
        "    '''Move motor1 home.'''\n"
        "    yield from bps.mv(motor1, 0)\n")
    r = await api.post("/api/device-config/reload")
    assert r.status_code == 200, r.text
    answer = await preflight(api, "home_motor1")
    assert sources(answer) == {"motor1": "dry_run"} and answer["complete"] is True


async def test_arguments_nested_too_deep_are_refused(api_of):
    api = api_of()
    deep: Any = "det1"
    for _ in range(40):
        deep = [deep]
    r = await api.post("/api/preflight", json={"item": {"name": "count", "args": [deep]}})
    assert r.status_code == 422 and "nested deeper than 32 levels" in r.json()["message"]
    # A plan that allocates without bound fails in its own process, with the reason.
    answer = await preflight(api, "scan", ["det1"], "motor1", -1, 1, 10**10)
    assert answer["complete"] is False and "MemoryError" in answer["reason"]
    assert sources(answer) == {"det1": "argument", "motor1": "argument"}


async def test_a_caller_that_goes_away_leaves_no_answer_for_the_next_item(test_collection):
    """The service's runner of dry runs, with a real child: a dry run whose caller is cancelled
    (a server may cancel a request whose client disconnected) still ends its exchange."""
    from bs_coordination.service.discovery import DeviceRegistry, DiscoveryConfig
    from bs_coordination.service.preflight_runner import PreflightRunner

    registry = DeviceRegistry(DiscoveryConfig(path=str(test_collection)))
    registry.start()
    runner = PreflightRunner(registry, time_limit=1.0)
    try:
        count = {"name": "count", "args": [["det1"]], "kwargs": {}}
        assert (await runner.dry_run(count))["complete"] is True  # the child is warm
        gone = asyncio.create_task(runner.dry_run({"name": "hanging_plan", "args": [["det2"]]}))
        await asyncio.sleep(0.3)  # the dry run hangs in the child
        gone.cancel()
        answer = await runner.dry_run(count)
        assert answer["complete"] is True
        assert [d["device_name"] for d in answer["devices"]] == ["det1"]
    finally:
        await runner.close()
        await registry.close()


@pytest.mark.redis
async def test_conflicts_come_from_the_redis_store_too(service_factory, redis_server):
    svc = service_factory(str(redis_server.url), profile_collection=str(EXAMPLE_COLLECTION))
    async with httpx.AsyncClient(base_url=svc.url, timeout=90) as api:
        key = await lock(api, "motor2", "MAINTENANCE", "bob", reason="bake-out of the axis")
        answer = await preflight(api, "park_and_count", ["det1"])
        assert answer["can_start"] is False
        assert [(c["device_name"], c["lock"]["user_id"]) for c in answer["conflicts"]] == [
            ("motor2", "bob")]
        await release(api, key)
        assert (await preflight(api, "park_and_count", ["det1"]))["can_start"] is True
