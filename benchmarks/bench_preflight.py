"""Preflight latency: ``POST /api/preflight`` through a real service with the example collection.

Measures, in one run:

- the first preflight, which starts the dry-run child and loads the collection (cold);
- then, with the child warm, the answer time of ``scan([det], motor, -1, 1, 100)`` and of a
  1,000-point ``grid_scan([det], motor1, -1, 1, 40, motor2, -1, 1, 25)`` (goal: under 1 s
  each), with a MAINTENANCE lock held on a device of the scan so the conflict path runs too;
- the anchor: the same plan driven by bluesky's ``RunEngineSimulator`` in this process, with
  no service, no child and no lock table (what a dry run costs at the least).

Run: ``python benchmarks/bench_preflight.py`` (or ``python benchmarks/run.py preflight``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _common import HEADER, free_port, percentile, process, row

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "profile_collection_example"
REPEATS = 10
GOAL_S = 1.0

SCAN = {"name": "scan", "args": [["det"], "motor", -1, 1, 100], "kwargs": {}}
GRID = {"name": "grid_scan", "args": [["det"], "motor1", -1, 1, 40, "motor2", -1, 1, 25],
        "kwargs": {}}


def preflight(client: httpx.Client, item: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    r = client.post("/api/preflight", json={"item": item})
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def in_process(plan_name: str) -> float:
    """The anchor: the plan's messages through ``RunEngineSimulator`` here, best of 3."""
    import bluesky.plans as bp
    from bluesky.simulators import RunEngineSimulator
    from ophyd.sim import det, motor, motor1, motor2

    def plan() -> Any:
        if plan_name == "scan":
            return bp.scan([det], motor, -1, 1, 100)
        return bp.grid_scan([det], motor1, -1, 1, 40, motor2, -1, 1, 25)

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        RunEngineSimulator().simulate_plan(plan())
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "bs_coordination.service", "--host", "127.0.0.1", "--port",
            str(port), "--log-level", "WARNING", "--profile-collection", str(EXAMPLE)]
    lines = [HEADER]
    ok = True
    with process(args, f"{url}/api/health/live"), httpx.Client(base_url=url, timeout=120) as c:
        cold, answer = preflight(c, SCAN)
        assert answer["complete"], answer
        key = c.post("/api/lock/request", json={
            "device_name": "motor", "lock_type": "MAINTENANCE", "user_id": "bench",
            "reason": "benchmark", "timeout": 600}).json()["lock_key"]
        for label, item in (("scan([det], motor, -1, 1, 100)", SCAN),
                            ("grid_scan 40 x 25 = 1,000 points", GRID)):
            times = []
            for _ in range(REPEATS):
                took, answer = preflight(c, item)
                times.append(took)
            assert answer["complete"], answer
            messages = answer["messages"]
            if item is SCAN:
                assert answer["can_start"] is False, answer  # the MAINTENANCE lock is seen
            p50, worst = percentile(times, 50), max(times)
            anchor = in_process(item["name"])
            ok = ok and worst < GOAL_S
            lines.append(row(f"preflight {label}, warm ({messages} messages; p50, max of "
                             f"{REPEATS})", f"{p50 * 1000:.0f} ms, max {worst * 1000:.0f} ms",
                             f"RunEngineSimulator in-process {anchor * 1000:.0f} ms",
                             p50 / anchor, f"< {GOAL_S:g} s: {'met' if worst < GOAL_S else 'MISSED'}"))
        c.post("/api/lock/release", json={"lock_key": key}).raise_for_status()
    print(f"first preflight (starts the dry-run child, loads the collection): {cold:.2f} s\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
