"""What the bridge's PVs show for a device (pure: no Channel Access)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from bs_coordination.epics.bridge import LockPVs, holder_text, lock_shown
from bs_coordination.models import DeviceLock, LockType

pytestmark = pytest.mark.epics


def held(name: str, lock_type: LockType, user: str, token: int) -> DeviceLock:
    return DeviceLock(device_name=name, lock_type=lock_type, priority=lock_type.priority,
                      user_id=user, acquired_at=datetime.now(timezone.utc), token=token)


def test_own_lock_then_the_highest_priority_component_lock_then_free():
    queue = held("det1", LockType.QUEUE_EXECUTING, "queue_server", 1)
    cam = held("det1.cam", LockType.MANUAL_OPERATOR, "alice", 2)
    stats = held("det1.stats", LockType.MAINTENANCE, "bob", 3)
    other = held("det10", LockType.MAINTENANCE, "bob", 4)  # a name that only starts alike
    assert lock_shown({"det1": queue, "det1.cam": cam}, "det1") is queue
    assert lock_shown({"det1.cam": cam, "det1.stats": stats, "det10": other}, "det1") is stats
    assert lock_shown({"det1.cam": cam, "det10": other}, "det1") is cam
    assert lock_shown({"det10": other}, "det1") is None


def test_pvs_names_and_refusals():
    pvs = LockPVs("BL:", ["m1", "det1", "m1"])
    assert sorted(pvs.pvdb) == ["BL:det1:HOLDER", "BL:det1:LOCK", "BL:m1:HOLDER", "BL:m1:LOCK"]
    assert pvs.lock["m1"].value == -1
    assert pvs.lock["m1"].alarm.severity == 3  # INVALID until in step with the service
    with pytest.raises(ValueError, match="component"):
        LockPVs("BL:", ["m1.user_setpoint"])
    with pytest.raises(ValueError, match="no devices"):
        LockPVs("BL:", [])


def test_holder_fits_a_channel_access_string():
    assert holder_text("queue_server") == "queue_server"
    assert holder_text("x" * 100) == "x" * 39
    assert holder_text("José") == "José"  # Latin-1
    assert holder_text("李雷") == "??"
