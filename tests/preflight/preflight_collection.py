"""A copy of the example profile collection with plans that a dry run cannot finish: adaptive
ones (they decide on readings), one that hangs, one that blocks even the dry run's alarm, one
that raises and one that ends its process."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "profile_collection_example"

#: Loaded after the example's own files (the queue server loads them in name order).
TEST_PLANS = '''
import os as _os
import signal as _signal
import time as _time


def adaptive_count(detectors, motor, threshold=0.5):
    """Read the first detector; above ``threshold``, move ``motor`` before counting."""
    reading = yield from bps.read(detectors[0])
    if reading[detectors[0].name]["value"] > threshold:
        yield from bps.mv(motor, 1)
    return (yield from bp.count(detectors))


def adaptive_rd(detectors, threshold=0.5):
    """Read the first detector with bps.rd; above ``threshold``, move ``motor2`` too."""
    value = yield from bps.rd(detectors[0])
    if value > threshold:
        yield from bps.mv(motor2, 1)
    return (yield from bp.count(detectors))


def hanging_plan(detectors):
    """Moves motor1, then waits for something that never comes."""
    yield from bps.mv(motor1, 0)
    _time.sleep(3600)
    return (yield from bp.count(detectors))


def stubborn_plan(detectors):
    """Hangs with the alarm signal blocked: only a kill stops it."""
    yield from bps.mv(motor1, 0)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGALRM})
    _time.sleep(3600)
    return (yield from bp.count(detectors))


def raising_plan(detectors):
    """Moves motor1, then fails."""
    yield from bps.mv(motor1, 1)
    raise RuntimeError("the beam is down")


def asking_plan(detectors):
    """Asks whoever runs it before counting."""
    if input("count now? ") != "yes":
        return
    yield from bp.count(detectors)


def crashing_plan(detectors):
    """Moves motor1, then ends the process it runs in."""
    yield from bps.mv(motor1, 1)
    _os._exit(3)
'''


def write_collection(root: Path) -> Path:
    """The example collection plus the test plans, in ``root``; returns the collection path."""
    target = root / "collection"
    shutil.copytree(EXAMPLE / "startup", target / "startup")
    (target / "startup" / "50-preflight-test-plans.py").write_text(TEST_PLANS)
    return target
