"""The example profile collection under a real queue server (start-re-manager, its own Redis):
queue items hold their devices with their item uid, and a MAINTENANCE lock suspends the
running item, which then completes by itself after the release."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Service, wait_until

STARTUP = Path(__file__).resolve().parents[2] / "profile_collection_example" / "startup"

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def manager(redis_server: Any, live_service: Any, tmp_path: Path) -> Iterator[Any]:
    from bluesky_queueserver_api.zmq import REManagerAPI

    control, info = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    tool = Path(sys.executable).with_name("start-re-manager")
    env = {**os.environ, "COORDINATION_URL": live_service.url, "COORDINATION_USER": "qserver",
           "COORDINATION_WAIT": "5", "COORDINATION_LEASE": "30"}
    log = (tmp_path / "manager.log").open("wb")
    proc = subprocess.Popen(
        [str(tool), "--startup-dir", str(STARTUP),
         "--existing-plans-devices", str(STARTUP / "existing_plans_and_devices.yaml"),
         "--update-existing-plans-devices", "NEVER",
         "--user-group-permissions", str(STARTUP / "user_group_permissions.yaml"),
         "--redis-addr", f"127.0.0.1:{redis_server.port}",
         "--zmq-control-addr", control, "--zmq-info-addr", info,
         "--zmq-publish-console", "OFF", "--console-output", "OFF"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    RM = REManagerAPI(zmq_control_addr=control, zmq_info_addr=info, timeout_recv=5,
                      timeout_send=5)
    try:
        wait_until(lambda: _status(RM) is not None, timeout=30, what="the RE manager answers")
        RM.environment_open()
        RM.wait_for_idle(timeout=60)
        assert RM.status()["worker_environment_exists"]
        yield RM
    finally:
        try:
            if RM.status()["worker_environment_exists"]:
                RM.environment_close()
                RM.wait_for_idle(timeout=30)
        except Exception:
            pass
        RM.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _status(RM: Any) -> dict[str, Any] | None:
    try:
        return dict(RM.status())
    except Exception:
        return None


def test_queue_items_hold_their_devices_and_suspend_for_maintenance(
        manager: Any, service: Service) -> None:
    from bluesky_queueserver_api import BPlan

    RM = manager
    added = RM.item_add(BPlan("slow_count", ["det1"], num=8, delay=0.2))  # about 1.6 s
    uid = added["item"]["item_uid"]
    RM.queue_start()
    held = wait_until(lambda: service.held("qserver"), timeout=30,
                      what="the running item takes its locks")
    assert set(held) == {"det1"}
    assert held["det1"]["plan_uid"] == uid
    assert "slow_count" in held["det1"]["reason"]

    key = service.lock("det1", "MAINTENANCE", "maint_bob", reason="swapping the detector")
    wait_until(lambda: service.held("qserver").get("det1", {}).get("state") == "preempted",
               what="the item's lock is preempted")
    time.sleep(2.0)  # longer than the whole item: it would have finished unless suspended
    status = RM.status()
    assert status["manager_state"] == "executing_queue"
    assert status["items_in_history"] == 0
    service.release(key)

    RM.wait_for_idle(timeout=60)
    history = RM.history_get()["items"]
    assert history[-1]["item_uid"] == uid
    assert history[-1]["result"]["exit_status"] == "completed"
    assert service.locks() == []
