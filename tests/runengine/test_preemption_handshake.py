"""Maintenance's answer means the plan has stopped: with ``install(RE)`` the plan's locks ask
for the preemption handshake, so the MAINTENANCE request is answered only once the RunEngine
has suspended (``stop()`` called on the movers). 30 trials of each pattern: a scan, a tight
``mv`` loop, a slow motor mid-move, a blocking detector read. Every device write is timed
(``time.monotonic()``, the clock the answer is timed with too)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import httpx
import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from ophyd.sim import SynAxis, SynGauss

from .conftest import Recorder, wait_until

TRIALS = 30


class RecordingMotor(SynAxis):
    """A simulated motor that records the time of every ``set()`` and ``stop()``; ``armed``
    is set once it has been set ``arm_after`` times (maintenance waits for that)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sets: list[tuple[float, Any]] = []
        self.stops: list[float] = []
        self.arm_after = 0
        self.armed = threading.Event()

    def set(self, value: Any, **kwargs: Any) -> Any:
        self.sets.append((time.monotonic(), value))
        status = super().set(value, **kwargs)
        if len(self.sets) == self.arm_after:
            self.armed.set()
        return status

    def stop(self, *, success: bool = False) -> None:
        self.stops.append(time.monotonic())
        super().stop(success=success)


class BlockingDetector(SynGauss):
    """A detector whose ``trigger()`` blocks the RunEngine thread for ``block`` seconds (a
    synchronous read); records when each trigger starts and ends."""

    def __init__(self, *args: Any, block: float = 0.02, **kwargs: Any) -> None:
        self.triggers: list[tuple[float, float]] = []
        self.arm_after = 0
        self.armed = threading.Event()
        self.block = 0.0  # SynGauss triggers once while it is made
        super().__init__(*args, **kwargs)
        self.block = block

    def trigger(self) -> Any:
        start = time.monotonic()
        if len(self.triggers) + 1 == self.arm_after:
            self.armed.set()  # maintenance asks while this read blocks
        time.sleep(self.block)
        status = super().trigger()
        self.triggers.append((start, time.monotonic()))
        return status


@dataclass
class Trial:
    answer: dict[str, Any] = field(default_factory=dict)
    asked: float = 0.0
    answered: float = 0.0
    released: float = 0.0


def _maintenance(url: str, device: str, armed: threading.Event, trial: Trial,
                 hold: float = 0.02) -> threading.Thread:
    """In a thread: when ``armed``, lock ``device`` for maintenance, hold it, release it."""

    def run() -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            http.get("/api/health/live")  # connected before the moment comes
            if not armed.wait(10):
                return
            trial.asked = time.monotonic()
            r = http.post("/api/lock/request", json={
                "device_name": device, "lock_type": "MAINTENANCE", "user_id": "maint_bob",
                "reason": "handshake test"})
            trial.answered = time.monotonic()
            trial.answer = r.json()
            time.sleep(hold)  # maintenance works on the device
            trial.released = time.monotonic()
            http.post("/api/lock/release", json={"lock_key": trial.answer["lock_key"]})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def handshake_RE(RE: RunEngine, coordinate: Any) -> Iterator[RunEngine]:
    handle = coordinate()
    assert handle.coordinator.acknowledge_preemption
    yield RE


def _run_trials(RE: RunEngine, url: str, device: str, arm: Callable[[int], threading.Event],
                plan: Callable[[], Any], check: Callable[[Trial, Recorder], None]) -> None:
    """``TRIALS`` plans that maintenance preempts. On this busy machine a request sometimes
    arrives only after its short plan ended (it then preempts nothing): such a run does not
    count, and is run again (at most ``TRIALS`` more runs)."""
    preempted = attempts = 0
    while preempted < TRIALS:
        attempts += 1
        assert attempts <= 2 * TRIALS, f"only {preempted} of {attempts} runs were preempted"
        trial = Trial()
        armed = arm(attempts)
        thread = _maintenance(url, device, armed, trial)
        recorder = Recorder()
        RE(plan(), recorder)
        thread.join(10)
        assert trial.answer.get("success") is True, trial.answer
        assert trial.answer["acknowledged"] is True, trial.answer
        if not trial.answer["preempted"]:
            continue
        preempted += 1
        # It took the device from the running plan, which acknowledged.
        (displaced,) = trial.answer["preempted"]
        assert displaced["user_id"] == "queue_server", trial.answer
        assert displaced["preemption_ack"] == "acknowledged", trial.answer
        check(trial, recorder)


def _writes_between(times: list[float], start: float, end: float) -> list[float]:
    return [t for t in times if start <= t < end]


def _every_point(rec: Recorder, points: int) -> None:
    """The plan resumed and recorded every point. A suspension rewinds to the last checkpoint.
    When it is requested just before a point's ``save`` (the preemption reached the plugin
    late, after the point's last read), bluesky still saves that point, and then takes it
    again after the rewind. The repeat gets the same ``seq_num``: that is how bluesky marks a
    re-taken point (bluesky PR #117). Plain bluesky does the same with any suspender
    requested at that moment. One preemption means one suspension, so at most one point is
    repeated."""
    seq = sorted(e["seq_num"] for e in rec.primary)
    assert sorted(set(seq)) == list(range(1, points + 1)), seq
    assert len(seq) - points <= 1, seq


def test_scan(handshake_RE: RunEngine, live_service: Any) -> None:
    motor = RecordingMotor(name="motor")
    det = SynGauss("det", motor, "motor", center=0, Imax=1)

    def arm(i: int) -> threading.Event:
        motor.sets.clear()
        motor.armed.clear()
        # Early enough that the preemption lands inside the run (a suspension after the
        # run closed is a separate matter: bluesky would replay the closed run's readings).
        motor.arm_after = 2 + i % 7
        return motor.armed

    def check(trial: Trial, rec: Recorder) -> None:
        times = [t for t, _ in motor.sets]
        assert _writes_between(times, trial.answered, trial.released) == []
        _every_point(rec, 30)
        assert motor.position == pytest.approx(1.0)

    _run_trials(handshake_RE, live_service.url, "motor", arm,
                lambda: bp.scan([det], motor, 0, 1, 30), check)


def test_tight_mv_loop(handshake_RE: RunEngine, live_service: Any) -> None:
    motor = RecordingMotor(name="motor")
    STEPS = 120  # a tight loop, long enough that maintenance comes mid-loop

    def mv_loop() -> Any:
        for n in range(STEPS):
            yield from bps.checkpoint()
            yield from bps.mv(motor, n)

    def arm(i: int) -> threading.Event:
        motor.sets.clear()
        motor.armed.clear()
        motor.arm_after = 2 + i % 9
        return motor.armed

    def check(trial: Trial, rec: Recorder) -> None:
        times = [t for t, _ in motor.sets]
        assert _writes_between(times, trial.answered, trial.released) == []
        assert {v for _, v in motor.sets} == set(range(STEPS))  # no step lost
        assert motor.position == STEPS - 1

    _run_trials(handshake_RE, live_service.url, "motor", arm, mv_loop, check)


def test_slow_motor_mid_move(handshake_RE: RunEngine, live_service: Any) -> None:
    motor = RecordingMotor(name="slow_motor", delay=0.03)
    det = SynGauss("det", motor, "slow_motor", center=0, Imax=1)

    def arm(i: int) -> threading.Event:
        motor.sets.clear()
        motor.stops.clear()
        motor.armed.clear()
        motor.arm_after = 1 + i % 3
        return motor.armed  # set as the move starts: maintenance asks mid-move

    def check(trial: Trial, rec: Recorder) -> None:
        times = [t for t, _ in motor.sets]
        assert _writes_between(times, trial.answered, trial.released) == []
        # The moving motor was stopped before maintenance was answered.
        assert _writes_between(motor.stops, trial.asked, trial.answered), motor.stops
        _every_point(rec, 5)
        assert motor.position == pytest.approx(1.0)

    _run_trials(handshake_RE, live_service.url, "slow_motor", arm,
                lambda: bp.scan([det], motor, 0, 1, 5), check)


def test_blocking_detector_read(handshake_RE: RunEngine, live_service: Any) -> None:
    motor = RecordingMotor(name="motor")
    det = BlockingDetector("det", motor, "motor", center=0, Imax=1, block=0.02)

    def arm(i: int) -> threading.Event:
        det.triggers.clear()
        det.armed.clear()
        det.arm_after = 1 + i % 4
        return det.armed

    def check(trial: Trial, rec: Recorder) -> None:
        starts = [s for s, _ in det.triggers]
        assert _writes_between(starts, trial.answered, trial.released) == []
        # The read in progress when maintenance asked ended before the answer.
        assert all(end <= trial.answered for s, end in det.triggers if s < trial.answered)
        _every_point(rec, 6)

    _run_trials(handshake_RE, live_service.url, "det", arm,
                lambda: bp.scan([det], motor, 0, 1, 6), check)


def test_without_the_handshake_maintenance_is_answered_at_once(
        RE: RunEngine, coordinate: Any, live_service: Any) -> None:
    handle = coordinate()
    handle.coordinator.acknowledge_preemption = False
    motor = RecordingMotor(name="motor")
    det = SynGauss("det", motor, "motor", center=0, Imax=1)
    trial = Trial()
    motor.arm_after = 3
    thread = _maintenance(live_service.url, "motor", motor.armed, trial)
    RE(bp.scan([det], motor, 0, 1, 10))
    thread.join(10)
    assert trial.answer["acknowledged"] is True  # nobody asked: nothing to wait for
    assert trial.answer["preempted"] == []
    wait_until(lambda: RE.state == "idle", what="the plan ends")


def test_a_paused_runengine_acknowledges_at_once(RE: RunEngine, coordinate: Any,
                                                 live_service: Any) -> None:
    coordinate()
    motor = RecordingMotor(name="motor")

    def plan() -> Any:
        yield from bps.checkpoint()
        yield from bps.mv(motor, 1)
        yield from bps.pause()
        yield from bps.mv(motor, 2)

    with pytest.raises(RunEngineInterrupted):
        RE(plan())
    assert RE.state == "paused"
    with httpx.Client(base_url=live_service.url, timeout=10) as http:
        start = time.monotonic()
        answer = http.post("/api/lock/request", json={
            "device_name": "motor", "lock_type": "MAINTENANCE", "user_id": "maint_bob"}).json()
        assert time.monotonic() - start < 1.0  # not the 2 s deadline: nothing runs while paused
        assert answer["acknowledged"] is True
        assert answer["preempted"][0]["preemption_ack"] == "acknowledged"
        http.post("/api/lock/release", json={"lock_key": answer["lock_key"]})
    RE.resume()  # the lock is restored: the plan goes on
    assert motor.position == 2
