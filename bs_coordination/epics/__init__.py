"""Locks enforced by the control system: the EPICS access-security bridge.

- ``bridge``: ``EpicsBridge`` and ``LockPVs`` serve ``<prefix><device>:LOCK`` and
  ``<prefix><device>:HOLDER`` over Channel Access, in step with the service
  (``bs-coordination epics-bridge``);
- ``acf``: ``render_acf`` writes the access-security file whose rules read those PVs
  (``bs-coordination epics-acf``);
- ``gate``: ``ResumeGate`` waits until the IOCs let the queue account write again, before a
  suspended RunEngine resumes;
- ``pvnames``: the PV names.

The bridge and the gate need caproto (``pip install 'bs-coordination[epics]'``); they are
imported on first use, so ``acf`` works without it. This package never imports the service.
"""

from __future__ import annotations

from typing import Any

from bs_coordination.epics.acf import Accounts, records_from_discovery, render_acf
from bs_coordination.epics.pvnames import FREE, holder_pv, lock_pv

_LAZY = {"EpicsBridge": "bridge", "LockPVs": "bridge", "ResumeGate": "gate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"bs_coordination.epics.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'bs_coordination.epics' has no attribute {name!r}")


__all__ = [
    "FREE",
    "Accounts",
    "EpicsBridge",
    "LockPVs",
    "ResumeGate",
    "holder_pv",
    "lock_pv",
    "records_from_discovery",
    "render_acf",
]
