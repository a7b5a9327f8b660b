"""Queue items under a real RE Manager with the example profile collection: their locks carry
the item uid, maintenance suspends a running item (which completes after the release), a
device held before the item starts fails it naming the holder, and reopening the environment
runs the startup code without duplicating the plugin."""

from __future__ import annotations

import time

import pytest
from bluesky_queueserver_api import BPlan

from .conftest import PLUGIN_WAIT, QUEUE_USER, QueueServer, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _queue_events(qs: QueueServer, since: str | None, uid: str) -> list[dict]:
    return [e for e in qs.locks.events(since)
            if e["lock"]["plan_uid"] == uid and e["lock"]["lock_type"] == "QUEUE_EXECUTING"]


def test_count_item_holds_exactly_its_devices_with_its_item_uid(qs: QueueServer) -> None:
    uid = qs.api.item_add(BPlan("count", ["det1", "det2"], num=10, delay=0.2))["item"]["item_uid"]
    qs.api.queue_start()
    held = wait_until(lambda: qs.locks.held(QUEUE_USER), what="the running item takes its locks")
    assert set(held) == {"det1", "det2"}
    for lock in held.values():
        assert lock["lock_type"] == "QUEUE_EXECUTING"
        assert lock["plan_uid"] == uid
        assert lock["state"] == "active"
        assert "count" in lock["reason"]
        assert "lock_key" not in lock
    assert qs.api.status()["running_item_uid"] == uid

    qs.api.wait_for_idle(timeout=30)
    last = qs.history()[-1]
    assert (last["item_uid"], last["result"]["exit_status"]) == (uid, "completed")
    assert qs.locks.locks() == []


def test_scan_item_locks_its_devices_once_and_releases_them(qs: QueueServer) -> None:
    since = qs.locks.last_event_id()
    uid = qs.api.item_add(BPlan("scan", ["det"], "motor", -1, 1, 5))["item"]["item_uid"]
    qs.api.queue_start()
    qs.api.wait_for_idle(timeout=30)
    last = qs.history()[-1]
    assert (last["item_uid"], last["result"]["exit_status"]) == (uid, "completed")

    # Every QUEUE_EXECUTING lock taken meanwhile carries the item's uid.
    executing = [e for e in qs.locks.events(since) if e["lock"]["lock_type"] == "QUEUE_EXECUTING"]
    assert executing and {e["lock"]["plan_uid"] for e in executing} == {uid}
    events = _queue_events(qs, since, uid)
    acquired = sorted(e["device_name"] for e in events if e["action"] == "acquired")
    released = sorted(e["device_name"] for e in events if e["action"] == "released")
    assert acquired == ["det", "motor"]  # one request per device: one plugin installed
    assert released == ["det", "motor"]
    assert all(e["lock"]["user_id"] == QUEUE_USER for e in events)
    assert qs.locks.locks() == []


def test_maintenance_suspends_the_running_item_which_then_completes(qs: QueueServer) -> None:
    qs.api.console_monitor.clear()
    uid = qs.api.item_add(BPlan("slow_scan", ["det2"], "motor2", 1, 10, 10, delay=0.25)
                          )["item"]["item_uid"]
    qs.api.queue_start()
    wait_until(lambda: qs.run_function("position_of", "motor2") >= 3, timeout=30,
               what="the scan reaches its third point")
    key = qs.locks.lock("motor2", "MAINTENANCE", "maint_bob", reason="replacing the encoder")
    wait_until(lambda: qs.locks.held(QUEUE_USER).get("motor2", {}).get("state") == "preempted",
               what="the item's lock on motor2 is preempted")
    # The status has no field for it; the worker's console output says why. Once it is
    # printed the RunEngine is suspending: no further plan message runs.
    why = wait_until(lambda: "Justification" in (text := qs.console()) and text,
                     what="the suspension's justification on the console")
    why = why[why.index("Justification"):]
    assert "motor2" in why and "maint_bob" in why and "replacing the encoder" in why, why
    stopped_at = qs.run_function("position_of", "motor2")
    time.sleep(1.5)  # six points' worth: the scan would have moved on unless suspended
    assert qs.run_function("position_of", "motor2") == stopped_at
    status = qs.api.status()
    assert status["manager_state"] == "executing_queue"
    assert status["running_item_uid"] == uid
    assert stopped_at < 10

    qs.locks.release(key)
    qs.api.wait_for_idle(timeout=60)
    last = qs.history()[-1]
    assert (last["item_uid"], last["result"]["exit_status"]) == (uid, "completed")
    assert qs.run_function("position_of", "motor2") == 10
    assert qs.locks.locks() == []


def test_device_held_before_the_item_starts_fails_it_naming_the_holder(qs: QueueServer) -> None:
    key = qs.locks.lock("det2", "MAINTENANCE", "maint_alice", reason="cable swap")
    try:
        uid = qs.api.item_add(BPlan("count", ["det2"], num=3))["item"]["item_uid"]
        started = time.monotonic()
        qs.api.queue_start()
        qs.api.wait_for_idle(timeout=PLUGIN_WAIT + 30)
        assert time.monotonic() - started >= PLUGIN_WAIT
        last = qs.history()[-1]
        assert last["item_uid"] == uid
        assert last["result"]["exit_status"] == "failed"
        message = last["result"]["msg"]
        assert "det2" in message
        assert "maint_alice" in message
        assert "MAINTENANCE" in message
        assert "cable swap" in message
        assert qs.locks.held(QUEUE_USER) == {}
    finally:
        qs.locks.release(key)


#: The guarded function of profile_collection_example/README.md ("Functions run with
#: function_execute are not coordinated"), verbatim but for the device.
GUARDED_FUNCTION = """
import os
from bs_coordination.guard import ManualAccessGuard

function_guard = ManualAccessGuard(os.environ.get("COORDINATION_URL", "http://localhost:60620"),
                                   user_id="queue_functions", reason="queue server function")

def park_motor(position=0.0):
    with function_guard.holding(motor1):
        motor1.set(position).wait()
    return float(motor1.position)
"""


def test_functions_bypass_the_runengine_unless_they_use_the_guard(qs: QueueServer) -> None:
    qs.upload(GUARDED_FUNCTION)
    key = qs.locks.lock("motor1", "MAINTENANCE", "maint_carol", reason="limit switch repair")
    try:
        # The documented limit: a function moves a device maintenance holds.
        assert qs.run_function("move_unguarded", "motor1", 2.0) == 2.0
        # The guarded function refuses, naming the holder, and moves nothing.
        result = qs.function_result("park_motor", position=0.5)
        assert not result["success"]
        assert "maint_carol" in result["msg"] and "motor1" in result["msg"], result["msg"]
        assert qs.run_function("position_of", "motor1") == 2.0
    finally:
        qs.locks.release(key)
    assert qs.run_function("park_motor", position=0.5) == 0.5
    assert qs.locks.held("queue_functions") == {}  # released after the move


def test_reopening_the_environment_installs_the_plugin_once(qs: QueueServer) -> None:
    report = qs.run_function("coordination_report")
    assert report["preprocessors"] == 1
    assert report["suspenders"] == ["LockPreemptedSuspender"]

    qs.reopen()  # a new worker runs the startup code again
    report = qs.run_function("coordination_report")
    assert report["preprocessors"] == 1
    assert report["all_preprocessors"] == 1
    assert report["suspenders"] == ["LockPreemptedSuspender"]

    # Startup code re-run in the same worker (as a script upload does): replaced, not added.
    answer = qs.api.script_upload(
        "from bs_coordination import install\n"
        "import os\n"
        "coordination = install(RE, url=os.environ['COORDINATION_URL'],\n"
        "                       user_id=os.environ['COORDINATION_USER'],\n"
        "                       wait=float(os.environ['COORDINATION_WAIT']), lease=30)\n")
    qs.api.wait_for_completed_task(answer["task_uid"], timeout=30)
    assert qs.api.task_result(answer["task_uid"])["result"]["success"]
    report = qs.run_function("coordination_report")
    assert (report["preprocessors"], report["suspenders"]) == (1, ["LockPreemptedSuspender"])

    # Behaviour: one lock request per device, with the item uid.
    since = qs.locks.last_event_id()
    uid = qs.api.item_add(BPlan("count", ["det1"], num=2))["item"]["item_uid"]
    qs.api.queue_start()
    qs.api.wait_for_idle(timeout=30)
    assert qs.history()[-1]["result"]["exit_status"] == "completed"
    acquired = [e for e in _queue_events(qs, since, uid) if e["action"] == "acquired"]
    assert [e["device_name"] for e in acquired] == ["det1"]
