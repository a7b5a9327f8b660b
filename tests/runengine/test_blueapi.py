"""A real blueapi worker (Diamond's bluesky worker service) runs coordinated plans.

blueapi creates its RunEngine inside ``BlueskyContext`` and offers no hook to run code on it,
so the recipe (README, "blueapi") is: build the context, start the worker, then
``install(ctx.run_engine, ...)``. The worker replaces ``RE.state_hook`` when it starts; the
plugin chains its hook to blueapi's, so both see every transition.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky.protocols import Movable, Readable
from bluesky.utils import MsgGenerator

from .conftest import USER, Service, wait_until

if sys.version_info < (3, 11):  # blueapi needs Python >= 3.11 (pyproject's test extra)
    pytest.skip("blueapi needs Python >= 3.11", allow_module_level=True)



def move_and_count(motor: Movable, det: Readable, position: float) -> MsgGenerator:
    """A plan as a beamline registers it with blueapi (typed parameters)."""
    yield from bps.mv(motor, position)
    yield from bp.count([det], num=3)


def slow_scan(motor: Movable, det: Readable, points: int) -> MsgGenerator:
    """A scan long enough to be preempted in the middle."""

    def per_step(detectors: Any, step: Any, pos_cache: Any) -> MsgGenerator:
        yield from bps.one_nd_step(detectors, step, pos_cache)
        yield from bps.sleep(0.03)

    yield from bp.scan([det], motor, 0, 1, points, per_step=per_step)


class Worker:
    """A blueapi ``TaskWorker`` with ``install()`` on its context's RunEngine."""

    def __init__(self, url: str) -> None:
        from blueapi.core import BlueskyContext
        from blueapi.worker import TaskWorker
        from ophyd_async.core import init_devices
        from ophyd_async.sim import PatternGenerator, SimMotor, SimPointDetector

        from bs_coordination import install

        self.ctx = BlueskyContext()
        pattern = PatternGenerator()
        with init_devices():  # ophyd-async devices, named "motor" and "det"
            motor = SimMotor()
            det = SimPointDetector(pattern)
        self.motor = motor
        self.ctx.register_device(motor)
        self.ctx.register_device(det)
        self.ctx.register_plan(move_and_count)
        self.ctx.register_plan(slow_scan)
        self.worker = TaskWorker(self.ctx)
        self.worker.start()
        self.handle = install(self.ctx.run_engine, url, USER, wait=0.5, lease=30)
        self.events: list[Any] = []
        self._done: dict[str, threading.Event] = {}
        self.worker.worker_events.subscribe(self._on_event)

    def _on_event(self, event: Any, _: Any = None) -> None:
        self.events.append(event)
        status = event.task_status
        if status is not None and status.task_complete:
            self._done.setdefault(status.task_id, threading.Event()).set()

    def run(self, name: str, **params: Any) -> Any:
        """Submit and begin a task as blueapi's REST API does; its final status."""
        from blueapi.worker import Task

        task_id = self.worker.submit_task(Task(name=name, params=params))
        done = self._done.setdefault(task_id, threading.Event())
        self.worker.begin_task(task_id)
        assert done.wait(30), "the blueapi task did not finish"
        return next(e.task_status for e in reversed(self.events)
                    if e.task_status is not None and e.task_status.task_id == task_id)

    def position(self) -> float:
        from bluesky.run_engine import call_in_bluesky_event_loop

        return float(call_in_bluesky_event_loop(self.motor.user_readback.get_value()))

    def close(self) -> None:
        self.handle.uninstall()
        self.worker.stop()


@pytest.fixture
def blueapi_worker(live_service: Any) -> Iterator[Worker]:
    worker = Worker(live_service.url)
    yield worker
    worker.close()


def test_blueapi_worker_runs_plans_holding_their_locks(blueapi_worker: Worker,
                                                       service: Service) -> None:
    held: list[dict[str, Any]] = []
    RE = blueapi_worker.ctx.run_engine
    token = RE.subscribe(lambda name, doc: held.append(service.held()), "event")
    status = blueapi_worker.run("move_and_count", motor="motor", det="det", position=1.5)
    RE.unsubscribe(token)

    assert status.task_failed is False and status.result.outcome == "success"
    assert len(held) == 3 and all(set(h) == {"motor", "det"} for h in held)
    assert blueapi_worker.position() == 1.5
    assert blueapi_worker.handle.status()["active"] is True
    assert service.locks() == []  # released when the worker's RunEngine went idle


def test_blueapi_task_on_a_device_under_maintenance_fails_naming_the_holder(
        blueapi_worker: Worker, service: Service) -> None:
    key = service.lock("motor", "MAINTENANCE", "maint_bob", reason="encoder swap")
    status = blueapi_worker.run("move_and_count", motor="motor", det="det", position=2.0)
    assert status.task_failed is True
    assert status.result.type == "LockConflictError"
    assert "maint_bob" in status.result.message and "encoder swap" in status.result.message
    assert blueapi_worker.position() == 0.0  # refused before the motor moved
    service.release(key)
    # ... and once maintenance is done the next task runs.
    status = blueapi_worker.run("move_and_count", motor="motor", det="det", position=2.0)
    assert status.task_failed is False
    assert blueapi_worker.position() == 2.0
    wait_until(lambda: service.locks() == [], what="the locks are released")


def test_blueapi_task_is_suspended_by_maintenance_and_resumes(blueapi_worker: Worker,
                                                               service: Service) -> None:
    RE = blueapi_worker.ctx.run_engine
    RE.record_interruptions = True
    events: list[int] = []
    interruptions: list[str] = []
    seen: dict[str, Any] = {}
    descriptors: dict[str, str] = {}

    def maintenance() -> None:
        key = service.lock("motor", "MAINTENANCE", "maint_bob", reason="encoder check")
        wait_until(lambda: interruptions, what="the suspension")
        seen["tripped"] = blueapi_worker.handle.suspender.tripped
        held, position = len(events), blueapi_worker.position()
        threading.Event().wait(0.3)  # maintenance works on the motor
        seen["events_while_held"] = len(events) - held
        seen["moved"] = blueapi_worker.position() != position
        service.release(key)

    def on_doc(name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            descriptors[doc["uid"]] = doc["name"]
        elif name == "event" and descriptors.get(doc["descriptor"]) == "interruptions":
            interruptions.append(str(doc["data"]["interruption"]))
        elif name == "event":
            events.append(doc["seq_num"])
            if len(events) == 4:
                threading.Thread(target=maintenance, daemon=True).start()

    token = RE.subscribe(on_doc)
    try:
        status = blueapi_worker.run("slow_scan", motor="motor", det="det", points=15)
    finally:
        RE.unsubscribe(token)
    assert status.task_failed is False
    assert seen == {"tripped": True, "events_while_held": 0, "moved": False}
    # blueapi's own worker events report the suspension to its clients.
    assert "SUSPENDING" in {str(e.state) for e in blueapi_worker.events}
    assert "maint_bob" in interruptions[0] and "encoder check" in interruptions[0]
    assert sorted(set(events)) == list(range(1, 16))
    assert blueapi_worker.position() == pytest.approx(1.0)
    wait_until(lambda: service.locks() == [], what="the locks are released")
