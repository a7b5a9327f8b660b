"""Device discovery of a generated 1,000-device profile collection, and what it costs locking.

Measures, in one run:

- how long discovery of 1,000 simulated devices (500 motors, 300 detectors, 200 two-axis
  stages, all ``ophyd.sim``) takes by running the startup code (``--discovery load``) and by
  reading the ``existing_plans_and_devices.yaml`` written from it (the fast path);
- lock+release latency through a real service (its own process, memory store) while nothing
  else happens (the anchor), and while a reload of that collection runs, as a ratio.

Run: ``python benchmarks/bench_discovery.py`` (or ``python benchmarks/run.py discovery``).
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx
from _common import HEADER, free_port, percentile, process, row

N_MOTORS, N_DETECTORS, N_STAGES = 500, 300, 200
PAIRS_ANCHOR = 400
MIN_PAIRS_DURING = 300

STARTUP = textwrap.dedent(
    f"""
    from ophyd import Component as Cpt, Device
    from ophyd.sim import SynAxis, SynGauss

    class XY(Device):
        x = Cpt(SynAxis)
        y = Cpt(SynAxis)

    _ns = globals()
    for _i in range({N_MOTORS}):
        _ns[f"m{{_i}}"] = SynAxis(name=f"m{{_i}}")
    for _i in range({N_DETECTORS}):
        _ns[f"det{{_i}}"] = SynGauss(f"det{{_i}}", _ns["m0"], "m0", center=0, Imax=1, sigma=1)
    for _i in range({N_STAGES}):
        _ns[f"stage{{_i}}"] = XY("", name=f"stage{{_i}}")
    """
)


def lock_pair(client: httpx.Client, device: str) -> float:
    """One lock request and its release; seconds taken."""
    t0 = time.perf_counter()
    r = client.post("/api/lock/request", json={
        "device_name": device, "lock_type": "MANUAL_OPERATOR", "user_id": "bench"})
    r.raise_for_status()
    key = r.json()["lock_key"]
    client.post("/api/lock/release", json={"lock_key": key, "device_name": device}
                ).raise_for_status()
    return time.perf_counter() - t0


def wait_ready(client: httpx.Client, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/api/health/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("the service did not become ready")


def discovery_seconds(client: httpx.Client) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    r = client.post("/api/device-config/reload", timeout=600)
    r.raise_for_status()
    status = r.json()
    return time.perf_counter() - t0, status["count"], status["component_count"]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-discovery-") as d:
        root = Path(d) / "profile_collection"
        (root / "startup").mkdir(parents=True)
        (root / "startup" / "00-devices.py").write_text(STARTUP)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "bs_coordination.service", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "WARNING", "--profile-collection",
                str(root), "--discovery", "load", "--discovery-timeout", "600"]
        with process(args, f"{url}/api/health/live"), httpx.Client(base_url=url,
                                                                     timeout=60) as client:
            wait_ready(client)
            load_s, count, names = discovery_seconds(client)
            (root / "startup" / "existing_plans_and_devices.yaml").write_text(
                client.get("/api/device-config/config/queueserver").text)

            for _ in range(20):  # warm up
                lock_pair(client, "m1")
            # Idle latency is measured before and after the reloads (half each), so a change
            # in the machine's load during the run does not pass for an effect of discovery.
            anchor = [lock_pair(client, "m1") for _ in range(PAIRS_ANCHOR // 2)]

            during: list[float] = []
            reloads = 0
            while len(during) < MIN_PAIRS_DURING and reloads < 20:
                done = threading.Event()

                def reload(done: threading.Event) -> None:
                    with httpx.Client(base_url=url, timeout=600) as c:
                        c.post("/api/device-config/reload").raise_for_status()
                    done.set()

                t = threading.Thread(target=reload, args=(done,))
                t.start()
                time.sleep(0.05)  # the child process is starting
                while not done.is_set():
                    during.append(lock_pair(client, "m1"))
                t.join()
                reloads += 1
            anchor += [lock_pair(client, "m1") for _ in range(PAIRS_ANCHOR // 2)]

        # The fast path: the same collection with its existing_plans_and_devices.yaml.
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "bs_coordination.service", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "WARNING", "--profile-collection",
                str(root), "--discovery", "auto"]
        with process(args, f"{url}/api/health/live"), httpx.Client(base_url=url,
                                                                     timeout=60) as client:
            wait_ready(client)
            yaml_s, yaml_count, _ = discovery_seconds(client)

    a50, a99 = percentile(anchor, 50) * 1e3, percentile(anchor, 99) * 1e3
    d50, d99 = percentile(during, 50) * 1e3, percentile(during, 99) * 1e3
    print(f"discovery of {count} devices ({names} names with components): startup code "
          f"{load_s:.2f} s, existing_plans_and_devices.yaml {yaml_s:.2f} s ({yaml_count} devices)")
    print(f"lock+release pairs: {len(anchor)} idle, {len(during)} during {reloads} reload(s)\n")
    print(HEADER)
    print(row("lock+release p50 during discovery", f"{d50:.2f} ms", f"{a50:.2f} ms idle",
              d50 / a50, "~1x (discovery runs in a child process)"))
    print(row("lock+release p99 during discovery", f"{d99:.2f} ms", f"{a99:.2f} ms idle",
              d99 / a99, "~1x"))
    print(row("discovery, YAML fast path vs startup code", f"{yaml_s:.2f} s",
              f"{load_s:.2f} s", yaml_s / load_s, "< 1x"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
