"""The example profile collection loads with the queue server's own loader, installs the
plugin from its environment settings, and its generated device list is up to date."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from bluesky_queueserver.manager.profile_ops import load_profile_collection

from bs_coordination.runengine.plans import CoordinatedPreprocessor

from .conftest import Recorder, Service

STARTUP = Path(__file__).resolve().parents[2] / "profile_collection_example" / "startup"


def test_example_collection_runs_queue_items_with_their_uid(
        live_service: Any, service: Service, recorder: Recorder,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATION_URL", live_service.url)
    monkeypatch.setenv("COORDINATION_USER", "qs_example")
    monkeypatch.setenv("COORDINATION_WAIT", "2")
    nspace = load_profile_collection(str(STARTUP))
    RE, handle = nspace["RE"], nspace["coordination"]
    try:
        assert [type(p) for p in RE.preprocessors] == [CoordinatedPreprocessor]
        # What the queue server's worker process carries while it runs an item.
        worker = multiprocessing.current_process()
        monkeypatch.setattr(worker, "_running_plan_info",
                            {"item_uid": "item-7", "name": "move_then_count"}, raising=False)
        seen: list[dict[str, Any]] = []
        recorder.on_event(1, lambda: seen.append(service.held("qs_example")))
        plan = nspace["move_then_count"](nspace["stage"].coarse.x, 1.5, [nspace["det"]])
        RE(plan, recorder)
        held = seen[0]
        assert set(held) == {"stage", "det"}
        assert {lk["plan_uid"] for lk in held.values()} == {"item-7"}
        assert all("move_then_count" in lk["reason"] for lk in held.values())
        assert nspace["stage"].coarse.x.position == 1.5
        assert service.locks() == []
    finally:
        handle.uninstall()


def test_existing_plans_and_devices_is_up_to_date(tmp_path: Path) -> None:
    tool = Path(sys.executable).with_name("qserver-list-plans-devices")
    subprocess.run([str(tool), "--startup-dir", str(STARTUP), "--file-dir", str(tmp_path)],
                   check=True, capture_output=True,
                   env={**os.environ, "COORDINATION_DISABLED": "1"}, timeout=60)
    fresh = yaml.safe_load((tmp_path / "existing_plans_and_devices.yaml").read_text())
    committed = yaml.safe_load((STARTUP / "existing_plans_and_devices.yaml").read_text())
    assert fresh == committed, "regenerate it as profile_collection_example/README.md says"
    assert {"motor", "motor1", "motor2", "det", "det1", "det2", "stage"} <= set(
        committed["existing_devices"])
