#!/usr/bin/env python
"""Run bluesky's own test suite without and with ``install(RE)`` and compare.

The suite is the one shipped inside the installed bluesky package (``bluesky/tests``), not a
copy. The script starts a lock service on the memory store, runs the chosen test files twice
with pytest (the second time every ``RunEngine`` the suite creates gets
``install(RE, url=<that service>)``, see ``bluesky_suite_plugin.py``), and prints:

- the tests that pass without the plugin and fail with it (the regressions), minus those in
  ``EXPECTED`` (tests that assert on the RunEngine's private internals; README lists them);
- the tests that pass in both runs but whose message stream (the commands the RunEngine
  processed, as ``RE.msg_hook`` sees them) or document stream (names, in order) differs;
- the locks the plugin left on the service after each test (only a halted plan should).

::

    python scripts/bluesky_suite.py                      # the default files (DEFAULT_FILES)
    python scripts/bluesky_suite.py test_plans.py -k count
    python scripts/bluesky_suite.py --all                # every test_*.py in bluesky/tests
    python scripts/bluesky_suite.py --json out.json ...  # also write the comparison as JSON

Exit status 0 when nothing regressed and every stream matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: The files that drive a RunEngine (the issue's list and the rest that run here).
DEFAULT_FILES = [
    "test_run_engine.py", "test_new_examples.py", "test_plans.py", "test_preprocessors.py",
    "test_suspenders.py", "test_scans.py", "test_plan_patterns.py", "test_supplemental_data.py",
    "test_flyer.py", "test_simulators.py", "test_multi_runs.py", "test_legacy_plans.py",
    "test_examples.py", "test_callbacks.py", "test_devices.py", "test_documents.py",
    "test_event_loop_funcs.py", "test_metadata.py", "test_protocols.py", "test_ramp_plan.py",
    "test_seq_num_indices_in_sync.py", "test_snaking.py", "test_streams.py", "test_utils.py",
    "test_tracing.py", "test_external_assets_and_paging.py", "test_bec.py", "test_logging.py",
    "test_buffering.py", "test_consolidators.py",
]

#: Seconds a test run in a pytest process of its own may take before it is killed.
ISOLATED_TIMEOUT = 300

#: Tests that may fail with the plugin because they assert on the RunEngine's private
#: internals (node id suffix -> why). Keep in step with the README.
EXPECTED: dict[str, str] = {}


def bluesky_tests_dir() -> Path:
    import bluesky

    return Path(bluesky.__file__).resolve().parent / "tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def lock_service() -> Iterator[str]:
    """The lock service on the memory store, in a child process; yields its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bs_coordination.service", "--host", "127.0.0.1",
         "--port", str(port), "--store", "memory", "--log-level", "WARNING"])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the lock service did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _pytest(targets: list[str], extra: list[str], report: Path, url: str | None,
            quiet: bool, timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """One pytest process on ``targets`` (files or node ids of bluesky's suite); killed after
    ``timeout`` seconds (a test that hangs despite pytest-timeout)."""
    tests = bluesky_tests_dir()
    env = dict(os.environ, BS_SUITE_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("BS_SUITE_URL", None)
    if url is not None:
        env["BS_SUITE_URL"] = url
    report.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "pytest.ini"  # bluesky's own settings are not shipped: none of ours
        ini.write_text("[pytest]\n")
        # --confcutdir: no conftest.py of a directory above bluesky's (e.g. this project's,
        # when the venv lives inside the checkout) joins the run.
        cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tests.parent),
               "--confcutdir", str(tests), "-p", "bluesky_suite_plugin", "-p", "no:cacheprovider",
               "-q", "--timeout", "120", "-W", "ignore::DeprecationWarning", *targets, *extra]
        try:
            subprocess.run(cmd, env=env, cwd=tmp, check=False, timeout=timeout,
                           stdout=subprocess.DEVNULL if quiet else None,
                           stderr=subprocess.DEVNULL if quiet else None)
        except subprocess.TimeoutExpired:  # the child is killed; its finished tests count
            pass
    result: dict[str, dict[str, Any]] = {}
    if report.exists():
        for line in report.read_text().splitlines():
            result.update(json.loads(line))
    return result


def _collect(targets: list[str], keyword: str) -> list[str]:
    tests = bluesky_tests_dir()
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tests.parent),
             "--confcutdir", str(tests), "-p", "no:cacheprovider", "--collect-only", "-q", *targets, "-k", keyword],
            cwd=tmp, check=False, capture_output=True, text=True)
    return [str(tests.parent / line.strip()) for line in out.stdout.splitlines()
            if "::" in line]


def run_suite(files: list[str], keyword: str | None, report: Path, url: str | None,
              quiet: bool) -> dict[str, dict[str, Any]]:
    """Run ``files`` of bluesky's suite (``url``: with the plugin on that service).

    Tests that send the process a real SIGINT (their name says ``sigint``) each run in a
    pytest process of their own: under load such a signal can land after the RunEngine's
    handler is gone and end the whole pytest session with ``KeyboardInterrupt``."""
    tests = bluesky_tests_dir()
    targets = [str(tests / f) for f in files]
    main_k = f"({keyword}) and not sigint" if keyword else "not sigint"
    results = _pytest(targets, ["-k", main_k], report, url, quiet)
    sigint_k = f"({keyword}) and sigint" if keyword else "sigint"
    for node in _collect(targets, sigint_k):
        one = _pytest([node], [], report, url, quiet, timeout=ISOLATED_TIMEOUT)
        results.update(one or {_node_id(node): _hung()})
    return results


def _node_id(path_id: str) -> str:
    return str(Path(path_id).relative_to(bluesky_tests_dir().parent))


def _hung() -> dict[str, Any]:
    return {"outcome": "hung", "msgs": [], "docs": [], "left": [],
            "error": f"no result after {ISOLATED_TIMEOUT} s: killed"}


def compare(off: dict[str, dict[str, Any]], on: dict[str, dict[str, Any]],
            again: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``again``: a second run without the plugin; tests whose streams differ between the two
    are nondeterministic (timing) and their streams are not compared."""
    passed_off = {t for t, r in off.items() if r["outcome"] == "passed"}
    noisy = set()
    if again is not None:
        noisy = {t for t in passed_off if t in again and (
            again[t]["msgs"] != off[t]["msgs"] or again[t]["docs"] != off[t]["docs"])}
    regressions = {t: on.get(t, {}).get("error") or on.get(t, {}).get("outcome", "missing")
                   for t in sorted(passed_off) if on.get(t, {}).get("outcome") != "passed"}
    expected = {t: e for t, e in regressions.items()
                if any(t.endswith(k) for k in EXPECTED)}
    unexpected = {t: e for t, e in regressions.items() if t not in expected}
    both = sorted(t for t in passed_off - noisy if on.get(t, {}).get("outcome") == "passed")
    msgs_differ = [t for t in both if off[t]["msgs"] != on[t]["msgs"]]
    docs_differ = [t for t in both if off[t]["docs"] != on[t]["docs"]]
    left = {t: r["left"] for t, r in on.items() if r["left"]}
    return {
        "tests": len(off),
        "passed_without": len(passed_off),
        "passed_with": sum(1 for r in on.values() if r["outcome"] == "passed"),
        "compared_streams": len(both),
        "nondeterministic_streams": sorted(noisy),
        "messages_processed": sum(len(off[t]["msgs"]) for t in both),
        "regressions": unexpected,
        "expected_regressions": expected,
        "message_streams_differ": msgs_differ,
        "document_streams_differ": docs_differ,
        "locks_left": left,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="test files of bluesky/tests "
                        "(default: the files that drive a RunEngine)")
    parser.add_argument("--all", action="store_true", help="every test_*.py of bluesky/tests")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--json", type=Path, help="write the comparison to this file")
    parser.add_argument("--show-output", action="store_true", help="show pytest's output")
    parser.add_argument("--save", type=Path, metavar="DIR",
                        help="keep the raw per-test records of each run in DIR")
    parser.add_argument("--without-from", type=Path, metavar="FILE",
                        help="take the run without the plugin from FILE (a saved without.json) "
                        "instead of running it")
    parser.add_argument("--twice-without", action="store_true",
                        help="run without the plugin twice: streams that differ between those "
                        "two runs (timing-dependent tests) are not compared")
    args = parser.parse_args(argv)

    tests = bluesky_tests_dir()
    if args.all:
        files = sorted(p.name for p in tests.glob("test_*.py"))
    else:
        files = args.files or [f for f in DEFAULT_FILES if (tests / f).exists()]
    quiet = not args.show_output
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        if args.without_from:
            off = json.loads(args.without_from.read_text())
        else:
            off = run_suite(files, args.keyword, Path(tmp) / "off.json", None, quiet)
        t1 = time.monotonic()
        again = (run_suite(files, args.keyword, Path(tmp) / "again.json", None, quiet)
                 if args.twice_without else None)
        t1b = time.monotonic()
        with lock_service() as url:
            on = run_suite(files, args.keyword, Path(tmp) / "on.json", url, quiet)
        t2 = time.monotonic()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for name, run in (("without", off), ("again", again), ("with", on)):
            if run is not None:
                (args.save / f"{name}.json").write_text(json.dumps(run))
    result = compare(off, on, again)
    result["seconds_without"], result["seconds_with"] = round(t1 - t0, 1), round(t2 - t1b, 1)
    result["files"] = files

    print(f"bluesky suite from {tests}: {result['tests']} tests in {len(files)} files")
    print(f"passed without the plugin: {result['passed_without']} ({result['seconds_without']} s); "
          f"with it: {result['passed_with']} ({result['seconds_with']} s)")
    print(f"pass without, fail with: {len(result['regressions'])}"
          f" (+ {len(result['expected_regressions'])} expected, see README)")
    for test, error in result["regressions"].items():
        print(f"  {test}: {error}")
    for test, error in result["expected_regressions"].items():
        print(f"  expected: {test}: {error}")
    if args.twice_without:
        print(f"streams that differ between two runs without the plugin (not compared): "
              f"{len(result['nondeterministic_streams'])}")
        for test in result["nondeterministic_streams"]:
            print(f"  nondeterministic: {test}")
    print(f"message/document streams compared: {result['compared_streams']} tests, "
          f"{result['messages_processed']} messages; differ: "
          f"{len(result['message_streams_differ'])} / {len(result['document_streams_differ'])}")
    for test in result["message_streams_differ"]:
        print(f"  messages differ: {test}")
    for test in result["document_streams_differ"]:
        print(f"  documents differ: {test}")
    print(f"tests after which locks were left (then force-released): {len(result['locks_left'])}")
    for test, locks in result["locks_left"].items():
        print(f"  {test}: {', '.join(locks)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ok = not (result["regressions"] or result["message_streams_differ"]
              or result["document_streams_differ"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
