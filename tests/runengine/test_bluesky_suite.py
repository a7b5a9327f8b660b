"""A representative part of bluesky's own test suite passes with ``install(RE)`` on every
RunEngine it creates, with the same message and document streams as without the plugin.

``scripts/bluesky_suite.py`` runs the comparison (the suite is the one inside the installed
bluesky); the whole of it takes many minutes, so CI runs two files of it: the plan stubs on
every kind of device bluesky's protocols allow (no ``parent``, locatable, old-style status,
...) and the supplemental-data preprocessors. README, "bluesky's own test suite", has the
figures for the whole suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bluesky_suite.py"
FILES = ["test_new_examples.py", "test_supplemental_data.py"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bluesky_suite_part_passes_the_same_with_the_plugin(tmp_path: Path) -> None:
    out = tmp_path / "comparison.json"
    # Streams that vary from run to run without the plugin: test_infinite_count stops on a
    # timer, test_uid_passthrough records a monitor (a random signal) for as long as it runs.
    timing = "not test_infinite_count and not test_uid_passthrough"
    proc = subprocess.run([sys.executable, str(SCRIPT), *FILES, "-k", timing,
                           "--json", str(out)], capture_output=True, text=True, timeout=580)
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    summary = proc.stdout
    assert result["passed_without"] >= 100, summary  # the suite really ran
    assert result["regressions"] == {}, summary
    assert result["expected_regressions"] == {}, summary
    assert result["compared_streams"] >= 100, summary
    assert result["message_streams_differ"] == [], summary
    assert result["document_streams_differ"] == [], summary
    assert result["locks_left"] == {}, summary
    assert proc.returncode == 0, summary
