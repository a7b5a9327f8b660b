"""Static checks run with the tests, so CI (which runs the README's test command) keeps them:
ruff (lint), mypy (types of the package) and import-linter (the import direction contracts
in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*args: str) -> None:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_ruff():
    run(sys.executable, "-m", "ruff", "check", ".")


@pytest.mark.slow
def test_mypy():
    run(sys.executable, "-m", "mypy")


def test_import_contracts():
    run(str(BIN / "lint-imports"))
