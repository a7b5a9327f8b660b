"""A RunEngine under ``install(RE)`` (the queue account) against a real IOC that enforces the
lock table: operators are refused while the plan holds ``m1``, maintenance fences the queue at
the IOC, and the plan resumes and completes once the IOC lets it write again."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from ca_parts import Proc, wait_until
from test_access_security import M1, PREFIX, acf, lock, release

from bs_coordination.models import LockType

pytestmark = pytest.mark.epics

STEPS = 60


def run_plan(url: str, env: dict[str, str], procs: list[Proc]) -> Proc:
    script = Path(__file__).with_name("re_plan.py")
    env = env | {"LOGNAME": "queue_server", "USER": "queue_server"}
    proc = Proc([sys.executable, str(script), "--url", url, "--prefix", PREFIX, "--record", M1,
                 "--steps", str(STEPS), "--gate"], env, "STEP 3")
    procs.append(proc)
    return proc.start()


def test_plan_holds_m1_maintenance_fences_it_at_the_ioc_and_it_resumes(
        live_service, ioc_factory, bridge_factory, ca_users, ca, procs):
    ioc_factory(acf(), {M1: "m1", "TST:m2": "m2"})
    bridge_factory(live_service.url, PREFIX, ["m1", "m2"])
    alice, queue, bob = ca_users("alice"), ca_users("queue_server"), ca_users("bob")
    wait_until(lambda: alice.can_write(M1), 15, "the IOC follows the bridge")
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    plan = run_plan(live_service.url, client_env | ca.client_env(), procs)
    # The plan holds m1: an operator's caput is refused, the plan's own writes go through.
    wait_until(lambda: not alice.can_write(M1), 2, "the IOC refuses alice while the plan runs")
    assert alice.read(f"{PREFIX}m1:LOCK") == 1
    assert alice.read(f"{PREFIX}m1:HOLDER") == "queue_server"
    assert alice.write(M1, -5.0) != -5.0
    wait_until(lambda: alice.read(M1) >= 5.0, 10, "the plan's writes go through")
    # Maintenance preempts m1: the IOC refuses the queue account, staff write.
    mkey = lock(live_service.url, "m1", LockType.MAINTENANCE, "bob")
    wait_until(lambda: not queue.can_write(M1), 2, "the IOC refuses the queue under MAINTENANCE")
    assert queue.write(M1, -7.0) != -7.0
    assert bob.write(M1, 999.0) == 999.0
    time.sleep(0.5)
    assert alice.read(M1) == 999.0  # the RunEngine is suspended (and fenced at the IOC)
    assert any("Suspending" in line for line in plan.lines)
    # Released: the queue's lock is restored, the plan resumes once the IOC lets it write,
    # and completes.
    release(live_service.url, "m1", mkey)
    assert plan.proc is not None
    plan.proc.wait(60)
    output = plan.output()
    assert "DONE success" in output, output[-3000:]
    assert "FAILED" not in output
    assert "waiting until the IOCs let 'queue_server' write m1" in output  # the gate ran
    assert alice.read(M1) == float(STEPS)
    wait_until(lambda: alice.can_write(M1), 2, "m1 is free after the plan")
