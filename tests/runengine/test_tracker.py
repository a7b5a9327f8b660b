"""``LockTracker``: which of the plan's locks are preempted, from answers, events and status
(pure: no service, no RunEngine)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from bs_coordination.models import DeviceLock, LockHolder, LockState, LockType
from bs_coordination.runengine._tracker import LockTracker, PlanLocks

NOW = datetime(2026, 11, 24, tzinfo=timezone.utc)


def lock(device: str, token: int, *, user: str = "qs", lock_type: LockType = LockType.QUEUE_EXECUTING,
         state: LockState = LockState.ACTIVE, by: str | None = None) -> DeviceLock:
    preempted_by = None
    if by is not None:
        preempted_by = LockHolder(device_name=device, lock_type=LockType.MAINTENANCE,
                                  priority=0, user_id=by, reason="fix", acquired_at=NOW)
    return DeviceLock(device_name=device, lock_type=lock_type, priority=lock_type.priority,
                      user_id=user, acquired_at=NOW, token=token, state=state,
                      preempted_by=preempted_by)


def setup() -> tuple[LockTracker, PlanLocks, list[dict[str, Any]]]:
    changes: list[dict[str, Any]] = []
    tracker = LockTracker("qs", lambda: changes.append(dict(tracker.preempted)))
    session = PlanLocks(plan_uid=None, reason=None, wait=0)
    tracker.open(session)
    return tracker, session, changes


def test_preempted_then_restored() -> None:
    tracker, session, changes = setup()
    tracker.track(session, lock("motor", 5))
    obj = object()
    session.cover("motor", obj)
    tracker.on_event("motor", lock("motor", 5, state=LockState.PREEMPTED, by="bob"), "preempted")
    assert set(tracker.preempted) == {"motor"}
    assert obj not in session.covered  # the next message touching it asks again
    tracker.on_event("motor", lock("motor", 9), "restored")
    assert tracker.preempted == {}
    assert session.held["motor"].token == 9
    assert changes == [{"motor": changes[0]["motor"]}, {}]


def test_events_of_others_and_stale_tokens_are_ignored() -> None:
    tracker, session, changes = setup()
    tracker.track(session, lock("motor", 5))
    tracker.on_event("motor", lock("motor", 4, state=LockState.PREEMPTED, by="bob"), "preempted")
    tracker.on_event("motor", lock("motor", 6, user="alice", lock_type=LockType.MANUAL_OPERATOR,
                                   state=LockState.PREEMPTED, by="bob"), "preempted")
    tracker.on_event("det", lock("det", 7, state=LockState.PREEMPTED, by="bob"), "preempted")
    assert tracker.preempted == {} and changes == []


def test_a_preemption_overtaking_the_grant_is_applied_when_the_grant_arrives() -> None:
    tracker, session, _ = setup()
    tracker.on_event("motor", lock("motor", 5, state=LockState.PREEMPTED, by="bob"), "preempted")
    tracker.track(session, lock("motor", 5))
    assert set(tracker.preempted) == {"motor"}


def test_status_after_reconnect_resynchronises() -> None:
    tracker, session, changes = setup()
    tracker.track(session, lock("motor", 5))
    tracker.track(session, lock("det", 5))
    # While disconnected: motor was preempted, det force-released.
    tracker.on_status([lock("motor", 5, state=LockState.PREEMPTED, by="bob")])
    assert set(tracker.preempted) == {"motor"}
    assert set(session.held) == {"motor"}
    tracker.on_status([lock("motor", 8)])  # restored meanwhile
    assert tracker.preempted == {} and changes[-1] == {}


def test_forgetting_a_plan_clears_its_preemptions() -> None:
    tracker, session, changes = setup()
    tracker.track(session, lock("motor", 5))
    tracker.on_event("motor", lock("motor", 5, state=LockState.PREEMPTED, by="bob"), "preempted")
    assert tracker.forget(session) is True
    assert tracker.preempted == {} and changes[-1] == {}
    assert tracker.forget(session) is False
