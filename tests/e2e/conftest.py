"""End-to-end harness: a real RE Manager (``start-re-manager``) loading
``profile_collection_example/startup``, its own private ``redis-server``, the lock service on a
loopback port, and the ``bluesky-queueserver-api`` client over ZMQ.

Opening the worker environment takes seconds, so one RE Manager (and one service) serves a
whole test module; ``qs`` checks between tests that the manager is idle with an empty queue
and that no lock is left. The manager runs in a process group of its own, killed at the end
whatever happened (its worker is a child process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from lockhttp import LockHttp

ROOT = Path(__file__).resolve().parents[2]
STARTUP = ROOT / "profile_collection_example" / "startup"

#: ``COORDINATION_WAIT`` of the plugin in the RE Manager's worker: short, so that the test of
#: a device held before the item starts fails the item quickly.
PLUGIN_WAIT = 2.0
#: ``COORDINATION_USER``: who the queue's ``QUEUE_EXECUTING`` locks belong to.
QUEUE_USER = "qserver"

#: Plans and functions uploaded into the worker for the tests (``script_upload``): a scan
#: that lingers at each point, a motor position reader and a report of what ``install()``
#: put into ``RE`` (one preprocessor, one suspender, whatever ran how often).
TEST_SCRIPT = '''
import time as _time
import bluesky.plans as _bp
import bluesky.plan_stubs as _bps


def slow_scan(detectors, motor, start, stop, num, delay=0.2):
    """scan() that waits ``delay`` seconds at each point (one checkpoint per point)."""
    def per_step(detectors, step, pos_cache):
        yield from _bps.one_nd_step(detectors, step, pos_cache)
        yield from _bps.sleep(delay)
    return (yield from _bp.scan(detectors, motor, start, stop, num, per_step=per_step))


def position_of(name):
    """Readback of a positioner of the namespace."""
    return float(globals()[name].position)


def move_unguarded(name, position):
    """Move a positioner directly, as any function may (nothing coordinates it)."""
    globals()[name].set(position).wait()
    return float(globals()[name].position)


def coordination_report():
    """What device coordination put into the RunEngine ``RE``."""
    return {
        "preprocessors": len([p for p in RE.preprocessors
                              if getattr(p, "_bs_coordination", False)]),
        "all_preprocessors": len(RE.preprocessors),
        "suspenders": sorted(type(s).__name__ for s in RE.suspenders),
        "commands": sorted(c for c in RE.commands if "coordination" in c),
    }
'''


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def _plugin_module(config: pytest.Config, path: Path) -> ModuleType:
    """The conftest module pytest loaded from ``path`` (they share the name ``conftest``)."""
    for plugin in config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) == str(path):
            return plugin  # type: ignore[no-any-return]
    raise RuntimeError(f"{path} is not loaded as a conftest")


@dataclass
class QueueServer:
    """A running RE Manager with an open environment: ``api`` (``REManagerAPI``), ``locks``
    (the lock service), ``log`` (the manager's output file)."""

    api: Any
    locks: LockHttp
    log: Path
    control_addr: str

    def run_function(self, name: str, *args: Any, timeout: float = 20, **kwargs: Any) -> Any:
        """Run a function of the worker namespace (``function_execute``) and return its value."""
        result = self.function_result(name, *args, timeout=timeout, **kwargs)
        assert result["success"], result
        return result["return_value"]

    def function_result(self, name: str, *args: Any, timeout: float = 20,
                        **kwargs: Any) -> dict[str, Any]:
        """``function_execute`` and the task's result (``success``, ``return_value``, ``msg``)."""
        from bluesky_queueserver_api import BFunc

        answer = self.api.function_execute(BFunc(name, *args, **kwargs), run_in_background=True)
        assert answer["success"], answer
        uid = answer["task_uid"]
        self.api.wait_for_completed_task(uid, timeout=timeout)
        return dict(self.api.task_result(uid)["result"])

    def upload(self, script: str) -> None:
        """``script_upload`` into the worker namespace, waiting until it has run."""
        answer = self.api.script_upload(script, update_lists=True)
        assert answer["success"], answer
        self.api.wait_for_completed_task(answer["task_uid"], timeout=30)
        result = self.api.task_result(answer["task_uid"])["result"]
        assert result["success"], result

    def upload_test_script(self) -> None:
        """Define the test plans and functions in the worker (and in the allowed lists)."""
        self.upload(TEST_SCRIPT)
        wait_until(lambda: "slow_scan" in self.api.plans_allowed(reload=True)["plans_allowed"],
                   timeout=20, what="the uploaded plans are allowed")

    def reopen(self) -> None:
        """Close and open the worker environment (a new worker runs the startup code)."""
        self.api.environment_close()
        self.api.wait_for_idle(timeout=30)
        self.api.environment_open()
        self.api.wait_for_idle(timeout=60)
        assert self.api.status()["worker_environment_exists"]
        self.upload_test_script()

    def console(self) -> str:
        """The worker's console output published since the monitor was enabled."""
        return str(self.api.console_monitor.text())

    def history(self) -> list[dict[str, Any]]:
        return list(self.api.history_get(reload=True)["items"])


def _answers(api: Any) -> bool:
    try:
        api.status(reload=True)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def e2e_redis(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A private redis-server for the RE Manager (one per module)."""
    root = _plugin_module(request.config, ROOT / "conftest.py")
    binary = root.redis_binary()
    if binary is None:
        if root.REQUIRE_REDIS:
            pytest.fail("redis-server is not installed, and CI requires the Redis tests to run")
        pytest.skip("redis-server is not installed (the queue server needs one)")
    with tempfile.TemporaryDirectory(prefix="bs-coord-e2e-redis-") as d:
        server = root.RedisServer(binary, Path(d))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def e2e_service(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The lock service (memory store) for one module."""
    shared = _plugin_module(request.config, ROOT / "tests" / "conftest.py")
    with shared.run_service("memory") as svc:
        yield svc


@pytest.fixture(scope="module")
def queue_server(request: pytest.FixtureRequest, e2e_redis: Any, e2e_service: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueServer]:
    """``start-re-manager`` with the example collection, its environment open."""
    from bluesky_queueserver_api.zmq import REManagerAPI

    free_port = _plugin_module(request.config, ROOT / "conftest.py").free_port
    control, info = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    tool = Path(sys.executable).with_name("start-re-manager")
    tmp = tmp_path_factory.mktemp("re-manager")
    env = {**os.environ, "COORDINATION_URL": e2e_service.url, "COORDINATION_USER": QUEUE_USER,
           "COORDINATION_WAIT": str(PLUGIN_WAIT), "COORDINATION_LEASE": "30"}
    env.pop("COORDINATION_DISABLED", None)
    log_path = tmp / "manager.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [str(tool), "--startup-dir", str(STARTUP),
         "--existing-plans-devices", str(STARTUP / "existing_plans_and_devices.yaml"),
         "--update-existing-plans-devices", "NEVER",
         "--user-group-permissions", str(STARTUP / "user_group_permissions.yaml"),
         "--redis-addr", f"127.0.0.1:{e2e_redis.port}",
         "--zmq-control-addr", control, "--zmq-info-addr", info,
         # Console output is published (the suspension's justification shows there).
         "--zmq-publish-console", "ON", "--console-output", "OFF"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = REManagerAPI(zmq_control_addr=control, zmq_info_addr=info, timeout_recv=10,
                       timeout_send=10)
    locks = LockHttp(e2e_service.url)
    try:
        wait_until(lambda: _answers(api), timeout=30, what="the RE Manager answers")
        api.environment_open()
        api.wait_for_idle(timeout=60)
        assert api.status()["worker_environment_exists"], log_path.read_text()
        qs = QueueServer(api, locks, log_path, control)
        api.console_monitor.enable()
        qs.upload_test_script()
        yield qs
    finally:
        try:
            if api.status()["worker_environment_exists"]:
                api.environment_close()
                api.wait_for_idle(timeout=20)
        except Exception:
            pass
        api.console_monitor.disable()
        api.close()
        locks.close()
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the manager's process group, then SIGKILL whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker, if the manager left it behind
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(10)


@pytest.fixture
def qs(queue_server: QueueServer) -> Iterator[QueueServer]:
    """The module's queue server, checked idle with an empty queue before and after the test,
    with no lock left in the service afterwards."""
    api = queue_server.api
    api.wait_for_idle(timeout=30)
    api.queue_clear()
    yield queue_server
    api.wait_for_idle(timeout=60)
    api.queue_clear()
    locks = queue_server.locks
    deadline = time.monotonic() + 5
    while (left := locks.locks()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in {lk["device_name"] for lk in left}:  # so that the next test starts clean
        locks.http.post("/api/lock/force-release", json={"device_name": name})
    assert left == [], f"locks left after the test: {left}"
