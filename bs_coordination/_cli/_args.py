"""Command-line arguments that argparse alone gets wrong (shared by ``bs-coordination`` and
``python -m bs_coordination.ophyd_ws``)."""

from __future__ import annotations

from collections.abc import Sequence

KEY_OPTIONS = ("--key", "--api-key")


def join_key_values(argv: Sequence[str], options: Sequence[str] = KEY_OPTIONS) -> list[str]:
    """``--key -Xy...`` -> ``--key=-Xy...`` (and the same for ``--api-key``): a lock key or an
    API key is URL-safe base64, which may start with ``-``, and argparse would otherwise take
    it for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out
