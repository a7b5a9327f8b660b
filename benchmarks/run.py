"""Run every benchmark (``bench_*.py`` beside this file) and print their tables.

``python benchmarks/run.py`` runs all; ``python benchmarks/run.py service redis`` runs
``bench_service.py`` and ``bench_redis.py``. Each benchmark prints its figures as ratios
against the anchor it measures in the same run. Benchmarks are never run as tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    chosen = [HERE / f"bench_{name}.py" for name in argv] or sorted(HERE.glob("bench_*.py"))
    failed = 0
    for path in chosen:
        print(f"\n## {path.stem}\n", flush=True)
        rc = subprocess.call([sys.executable, str(path)])
        if rc:
            print(f"({path.name} exited with {rc})")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
