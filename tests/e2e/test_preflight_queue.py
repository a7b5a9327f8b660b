"""Preflight under a real queue server (``start-re-manager`` with the example collection): the
service (with the same collection) dry-runs the waiting items; ``bs-coordination preflight
--queue`` and the reservations of ``bs-coordination-reserve``'s component follow the queue's
items as they are added and removed, including ``motor2``, which ``park_and_count`` moves
without naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bluesky_queueserver_api import BPlan

from .conftest import ROOT, QueueServer, wait_until
from .test_reservations import RESERVER, ReserverThread

pytestmark = [pytest.mark.slow, pytest.mark.redis]

CLI = str(Path(sys.executable).with_name("bs-coordination"))


@pytest.fixture(scope="module")
def e2e_service(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The lock service with the example collection (so it can dry-run the queue's plans)."""
    shared = None
    for plugin in request.config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) == str(ROOT / "tests" / "conftest.py"):
            shared = plugin
    assert shared is not None
    with shared.run_service("memory", profile_collection=str(ROOT / "profile_collection_example")
                            ) as svc:
        yield svc


@pytest.fixture
def reserver(qs: QueueServer) -> Iterator[ReserverThread]:
    r = ReserverThread(qs).start()
    try:
        yield r
    finally:
        r.stop()


def preflight_queue(qs: QueueServer, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "--url", qs.locks.url, "preflight", "--queue",
                           "--zmq-control-addr", qs.control_addr, *options],
                          capture_output=True, text=True, timeout=120)


def reserved(qs: QueueServer) -> dict[str, str]:
    """Device -> item uid of the reserver's QUEUE_QUEUED locks."""
    return {name: lk["plan_uid"] for name, lk in qs.locks.held(RESERVER).items()
            if lk["lock_type"] == "QUEUE_QUEUED"}


def test_preflight_queue_and_reservations_follow_the_queue(qs: QueueServer,
                                                          reserver: ReserverThread) -> None:
    api = qs.api
    done = preflight_queue(qs)
    assert done.returncode == 0 and "no plans are waiting" in done.stdout, done.stderr

    park = api.item_add(BPlan("park_and_count", ["det1"]))["item"]["item_uid"]
    scan = api.item_add(BPlan("scan", ["det2"], "motor1", -1, 1, 3))["item"]["item_uid"]
    # motor2 is reserved for park_and_count although the item never names it.
    wait_until(lambda: reserved(qs) == {"det1": park, "motor2": park, "det2": scan,
                                        "motor1": scan},
               what="reservations of the predicted devices of both items")

    done = preflight_queue(qs, "--json")
    assert done.returncode == 0, done.stderr
    answers = {a["item"]["item_uid"]: a for a in json.loads(done.stdout)}
    assert set(answers) == {park, scan}
    assert {d["device_name"]: d["source"] for d in answers[park]["devices"]} == {
        "det1": "argument", "motor2": "dry_run"}
    # Reservations (QUEUE_QUEUED) are not in a plan's way.
    assert answers[park]["can_start"] is True and answers[scan]["can_start"] is True

    key = qs.locks.lock("motor2", "MAINTENANCE", "bob", reason="bake-out", timeout=300)
    try:
        done = preflight_queue(qs)
        assert done.returncode == 2, done.stdout + done.stderr
        park_part, scan_part = done.stdout.split("scan(", 1)
        assert park in park_part and "BLOCKED" in park_part
        assert "motor2 (dry run)" in park_part and "bob" in park_part and "bake-out" in park_part
        assert scan in scan_part and "can start" in scan_part
        # The dashboard's list: the reserver checks every waiting item with its uid.
        listed = {i["item_uid"]: i for i in qs.locks.http.get("/api/preflight/items").json()[
            "items"]}
        assert listed[park]["can_start"] is False and listed[scan]["can_start"] is True
        assert listed[park]["conflicts"][0]["lock"]["user_id"] == "bob"
    finally:
        qs.locks.release(key)

    api.item_remove(uid=park)
    wait_until(lambda: reserved(qs) == {"det2": scan, "motor1": scan},
               what="the removed item's reservations (motor2 too) are dropped")
    done = preflight_queue(qs, "--json")
    assert done.returncode == 0, done.stderr
    assert [a["item"]["item_uid"] for a in json.loads(done.stdout)] == [scan]
    api.item_remove(uid=scan)
    wait_until(lambda: reserved(qs) == {}, what="no reservation left")
