"""The lock service's Redis loses its data while a plan runs: the plan does not carry on
unfenced. It is suspended with a reason naming the loss, takes its locks again (with larger
fencing tokens) and finishes every point."""

from __future__ import annotations

import threading
from typing import Any

import bluesky.plans as bp
import pytest
import redis
from bluesky import RunEngine

from .conftest import Devices, Recorder, Service, wait_until

pytestmark = [pytest.mark.redis]


@pytest.fixture
def live_service(service_factory: Any, redis_server: Any) -> Any:
    """The service on a private Redis (this module's plans run against it)."""
    return service_factory(redis_server.url)


def test_a_plan_is_suspended_when_the_store_loses_its_locks(
        RE: RunEngine, coordinate: Any, devices: Devices, service: Service,
        recorder: Recorder, redis_server: Any) -> None:
    handle = coordinate()
    RE.record_interruptions = True
    motor = devices.slow_motor
    seen: dict[str, Any] = {}
    flushed = threading.Event()

    def lose_the_store() -> None:
        seen["token_before"] = service.held()["slow_motor"]["token"]
        redis.Redis(port=redis_server.port).flushall()
        flushed.set()
        wait_until(lambda: recorder.interruptions, timeout=10.0, what="the suspension")

    def after_the_loss() -> None:
        seen["token_after"] = service.held()["slow_motor"]["token"]

    recorder.on_event(5, lose_the_store, background=True)
    recorder.on_event(25, after_the_loss)
    RE(bp.scan([devices.det], motor, 0, 10, 30), recorder)
    recorder.join()

    assert flushed.is_set()
    why = recorder.interruptions[0]
    assert "lost its data" in why, why
    # The plan took its lock again, with a larger fencing token, and finished every point.
    assert seen["token_after"] > seen["token_before"]
    assert sorted({e["seq_num"] for e in recorder.primary}) == list(range(1, 31))
    assert motor.position == pytest.approx(10)
    assert not handle.suspender.tripped
    assert service.locks() == []
