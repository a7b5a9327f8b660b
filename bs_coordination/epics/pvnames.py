"""PV names of the bridge and the device names it accepts (shared by the bridge, the ACF
generator and the resume gate)."""

from __future__ import annotations

import re

from bs_coordination.models import check_device_name

#: ``:LOCK`` value of a free device (no active lock).
FREE = -1


def check_epics_device_name(name: str) -> str:
    """Return ``name`` if the bridge can serve it; ``ValueError`` naming the rule otherwise.

    A served device is a root device (no ``.``): a dot in a PV name starts a field name at the
    IOC, and a record's ``ASG`` field names one group. A lock on a component (``det1.cam``)
    shows on its root's PVs (see ``bs_coordination.epics.bridge``).
    """
    check_device_name(name)
    if "." in name:
        raise ValueError(f"{name!r} is a component: the bridge serves root devices only "
                         f"({name.split('.', 1)[0]!r}); a component's locks show on its root")
    return name


# What a PV name prefix may hold: no spaces, quotes, backslashes, '.' (a field) or controls.
_PREFIX_RE = re.compile(r'^[^."\\\s\x00-\x1f\x7f$]*$')


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if PV names can start with it; ``ValueError`` naming the rule."""
    if not _PREFIX_RE.match(prefix) or len(prefix) > 40:
        raise ValueError(f"--prefix {prefix!r}: at most 40 characters, without spaces, quotes, "
                         "backslashes, '.' or '$'")
    return prefix


def lock_pv(prefix: str, device: str) -> str:
    """``<prefix><device>:LOCK``: the active lock's priority, -1 when free."""
    return f"{prefix}{device}:LOCK"


def holder_pv(prefix: str, device: str) -> str:
    """``<prefix><device>:HOLDER``: the active holder's ``user_id``, "" when free."""
    return f"{prefix}{device}:HOLDER"


__all__ = ["FREE", "check_epics_device_name", "check_prefix", "holder_pv", "lock_pv"]
