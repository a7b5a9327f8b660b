"""The README's two commands are the ones CI and users run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S)
    return [line.strip() for b in blocks[:2] for line in b.splitlines() if line.strip()]


def test_readme_opens_with_the_service_and_the_test_command():
    service, tests = readme_commands()[:2]
    assert "pip install" in service and "bs_coordination.service" in service
    assert "pip install" in tests and tests.rstrip().endswith("pytest")


def test_ci_runs_exactly_the_readme_test_command():
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
