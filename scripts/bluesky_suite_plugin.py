"""pytest plugin used by ``scripts/bluesky_suite.py`` while it runs bluesky's own test suite.

Loaded with ``-p bluesky_suite_plugin``; configured by environment variables:

- ``BS_SUITE_REPORT``: JSON lines file, one line per test as it ends: its outcome, the commands of
  the messages the RunEngine processed (from bluesky's ``bluesky.RE.msg`` debug log, the
  same stream ``RE.msg_hook`` sees), the names of the documents it emitted, and the locks
  left on the service after the test;
- ``BS_SUITE_URL``: when set, every ``RunEngine`` created gets ``install(RE, url=...)``
  (``RunEngine.__init__`` is wrapped), and after each test the plugin is uninstalled from
  them, the locks still held are recorded and then force-released (a halted plan keeps its
  locks by design; the next test must start on a free beamline).

Recording is the same in both runs, so it perturbs both alike.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any

import pytest

URL = os.environ.get("BS_SUITE_URL") or None
REPORT = os.environ.get("BS_SUITE_REPORT")
USER = "bluesky-suite"

_results: dict[str, dict[str, Any]] = {}
_current: dict[str, Any] | None = None
_handles: list[Any] = []


class _MessageRecorder(logging.Handler):
    """Keeps the command of every message the RunEngine logs to ``bluesky.RE.msg``."""

    def emit(self, record: logging.LogRecord) -> None:
        command = getattr(record, "msg_command", None)
        if command is not None and _current is not None:
            _current["msgs"].append(command)


def _http(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    assert URL is not None
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def pytest_configure(config: pytest.Config) -> None:
    msg_logger = logging.getLogger("bluesky.RE.msg")
    msg_logger.setLevel(logging.DEBUG)
    msg_logger.addHandler(_MessageRecorder(logging.DEBUG))

    from bluesky.run_engine import Dispatcher, RunEngine

    process = Dispatcher.process

    def recording_process(self: Any, name: Any, doc: Any) -> Any:
        if _current is not None:
            _current["docs"].append(getattr(name, "name", str(name)))
        return process(self, name, doc)

    Dispatcher.process = recording_process  # type: ignore[method-assign]

    if URL is None:
        return
    from bs_coordination import install

    init = RunEngine.__init__

    def coordinated_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _handles.append(install(self, url=URL, user_id=USER, wait=10.0, lease=60.0))

    RunEngine.__init__ = coordinated_init  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    global _current
    # "interrupted" until a report says otherwise (a KeyboardInterrupt ends the session).
    _current = {"outcome": "interrupted", "msgs": [], "docs": [], "left": [], "error": ""}
    _results[item.nodeid] = _current
    yield
    if REPORT and _current is not None:
        # One line per test as it ends: a run killed mid-test keeps what it had.
        with open(REPORT, "a") as f:
            f.write(json.dumps({item.nodeid: _current}) + "\n")
    _current = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Any) -> Any:
    yield  # the test's fixtures (its RunEngines' loops) are gone now
    handles, _handles[:] = list(_handles), []
    for handle in handles:
        try:
            handle.uninstall()
        except Exception:
            handle.coordinator.close()
    if URL is not None and _current is not None:
        locks = _http("GET", "/api/locks/status")["locks"]
        _current["left"] = sorted(f"{lk['device_name']}:{lk['state']}" for lk in locks)
        for name in {lk["device_name"] for lk in locks}:
            _http("POST", "/api/lock/force-release",
                  {"device_name": name, "reason": "bluesky suite: next test"})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    result = _results.get(report.nodeid)
    if result is None:
        return
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    if report.when == "setup" and outcome == "passed":
        result["outcome"] = "setup-passed"
    elif report.when == "call" or report.when == "setup":
        result["outcome"] = "error" if report.when == "setup" and outcome == "failed" else outcome
    elif report.when == "teardown" and report.failed and result["outcome"] == "passed":
        result["outcome"] = "error"
    if report.failed and not result["error"]:
        text = str(report.longrepr)
        lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
        result["error"] = (lines[0] if lines else text.splitlines()[-1] if text else "")[:300]
