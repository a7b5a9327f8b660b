"""``python -m bs_coordination.service`` (and the ``bs-coordination-service`` command)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import run_app
from .app import create_app
from .config import parse_settings


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment (a bad value exits 2 with one line), then serve."""
    import sys

    settings = parse_settings(sys.argv[1:] if argv is None else argv, os.environ)
    run_app(create_app(settings), settings)


if __name__ == "__main__":
    main()
