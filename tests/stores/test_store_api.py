"""The store API (request, release, renew, force_release, sweep, status, events), the same
assertions on every store: the memory store and a private Redis."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from bs_coordination.errors import (
    InvalidRequestError,
    LockConflictError,
    LockNotFoundError,
    LockNotOwnedError,
)
from bs_coordination.models import DeviceLock, LockAction, LockRequest, LockState, LockType, LockUpdateMessage
from bs_coordination.stores import Store
from bs_coordination.stores.base import event_order

OP = LockType.MANUAL_OPERATOR
MAINT = LockType.MAINTENANCE
QEXEC = LockType.QUEUE_EXECUTING
QQUEUED = LockType.QUEUE_QUEUED


def ask(names: str | list[str], lock_type: LockType = OP, user: str = "alice",
        **fields: object) -> LockRequest:
    key = "device_names" if isinstance(names, list) else "device_name"
    return LockRequest.model_validate({key: names, "lock_type": lock_type, "user_id": user,
                                       **fields})


def actions(events: list[LockUpdateMessage]) -> list[tuple[str, str]]:
    return [(e.action.value, e.device_name) for e in events]


async def test_grant_refuse_release_with_events_in_order(store: Store) -> None:
    assert await store.last_event_id() is None
    grant = await store.request(ask("det1", reason="alignment"), actor="alice")
    [lock] = grant.locks
    assert lock.device_name == "det1" and lock.state is LockState.ACTIVE and lock.token >= 1
    with pytest.raises(LockConflictError) as refused:
        await store.request(ask("det1.cam", user="bob"))
    assert refused.value.holder is not None and refused.value.holder.user_id == "alice"
    assert "alignment" in refused.value.message

    with pytest.raises(LockNotOwnedError):
        await store.release("not-the-key", "det1")
    with pytest.raises(LockNotFoundError):
        await store.release("not-the-key")
    released = await store.release(grant.lock_key, "det1", actor="alice")
    assert [r.device_name for r in released] == ["det1"]
    assert await store.all_locks() == []

    events = await store.events_after(None)
    assert actions(events) == [("acquired", "det1"), ("released", "det1")]
    assert events[0].actor == "alice" and events[0].lock.token == lock.token
    assert event_order(events[0].event_id) < event_order(events[1].event_id)
    assert await store.last_event_id() == events[-1].event_id
    assert await store.events_after(events[0].event_id) == events[1:]
    assert await store.events_after(events[-1].event_id) == []


async def test_atomic_set_is_all_or_nothing(store: Store) -> None:
    await store.request(ask("m2", user="bob"))
    with pytest.raises(LockConflictError):
        await store.request(ask(["m1", "m2", "m3"]))
    assert [lock.device_name for lock in await store.all_locks()] == ["m2"]
    grant = await store.request(ask(["m1", "m3"]))
    assert sorted(lock.device_name for lock in grant.locks) == ["m1", "m3"]
    assert len({lock.token for lock in grant.locks}) == 1
    assert len(await store.release(grant.lock_key)) == 2


async def test_preempt_restore_and_status_of_the_hierarchy(store: Store) -> None:
    alice = await store.request(ask("det1.cam", reason="focus"))
    staff = await store.request(ask("det1", MAINT, "staff", timeout=None))
    assert staff.locks[0].token > alice.locks[0].token

    status = await store.device_status("det1.cam")
    assert status.locked and status.lock is not None and status.lock.user_id == "staff"
    assert [p.user_id for p in status.preempted] == ["alice"]
    parent = await store.device_status("det1")
    assert parent.locked and [c.user_id for c in parent.component_locks] == ["alice"]
    assert parent.component_locks[0].state is LockState.PREEMPTED
    sibling = await store.device_status("det2")
    assert not sibling.locked and sibling.lock is None

    await store.release(staff.lock_key)
    [restored] = await store.all_locks()
    assert restored.user_id == "alice" and restored.state is LockState.ACTIVE
    assert restored.token > staff.locks[0].token
    assert actions(await store.events_after(None)) == [
        ("acquired", "det1.cam"), ("preempted", "det1.cam"), ("acquired", "det1"),
        ("released", "det1"), ("restored", "det1.cam")]
    # The restored lock keeps its key.
    assert len(await store.release(alice.lock_key, "det1.cam")) == 1


async def test_upgrade_and_consume_by_plan(store: Store) -> None:
    reserved = await store.request(ask("motor", QQUEUED, "queue", plan_uid="p1", timeout=60))
    executing = await store.request(ask("motor", QEXEC, "queue", plan_uid="p1", timeout=60))
    [lock] = await store.all_locks()
    assert lock.lock_type is QEXEC and lock.token == executing.locks[0].token
    assert ("consumed", "motor") in actions(await store.events_after(None))
    with pytest.raises(LockNotFoundError):
        await store.release(reserved.lock_key)
    upgraded = await store.request(ask("motor", MAINT, "queue", lock_key=executing.lock_key))
    assert upgraded.lock_key == executing.lock_key and upgraded.locks[0].lock_type is MAINT
    assert actions(await store.events_after(None))[-1] == ("upgraded", "motor")


async def test_renew_and_force_release(store: Store) -> None:
    grant = await store.request(ask("det1", timeout=30))
    before = grant.locks[0].expires_at
    [renewed] = await store.renew(grant.lock_key, 600)
    assert renewed.expires_at is not None and before is not None and renewed.expires_at > before
    with pytest.raises(LockNotFoundError):
        await store.renew("unknown", 10)
    with pytest.raises(InvalidRequestError):
        await store.renew((await store.request(ask("q1", QEXEC, "queue"))).lock_key, None)

    await store.request(ask("det2", OP, "bob"))
    await store.request(ask("det2", MAINT, "staff", timeout=None))
    removed = await store.force_release("det2", actor="admin")
    assert sorted(r.user_id for r in removed) == ["bob", "staff"]
    assert [a for a in actions(await store.events_after(None)) if a[0] == "force_released"] == [
        ("force_released", "det2"), ("force_released", "det2")]
    with pytest.raises(LockNotFoundError):
        await store.force_release("det2")


async def test_a_lease_runs_out_and_is_swept_once(store: Store, eventually) -> None:
    grant = await store.request(ask("det1", QEXEC, "queue", timeout=0.3))
    await store.request(ask("det2", OP, "bob", timeout=0.3))
    holder = await store.request(ask("det2", MAINT, "staff", timeout=None))  # preempts bob
    await eventually(lambda: _swept(store))
    assert [lock.user_id for lock in await store.all_locks()] == ["staff"]
    expired = [e for e in await store.events_after(None) if e.action is LockAction.EXPIRED]
    assert sorted(e.device_name for e in expired) == ["det1", "det2"]
    assert await store.sweep() == 0
    with pytest.raises(LockNotFoundError):
        await store.release(grant.lock_key)
    assert holder.lock_key


async def _swept(store: Store) -> bool:
    await store.sweep()
    return len(await store.all_locks()) == 1 and len(
        [e for e in await store.events_after(None) if e.action is LockAction.EXPIRED]) == 2


async def test_a_waiting_request_is_granted_on_release(store: Store) -> None:
    first = await store.request(ask("det1"))
    waiting = asyncio.create_task(store.request(ask("det1", user="bob", wait=10)))
    await asyncio.sleep(0.05)  # let it queue (the outcome does not depend on it)
    await store.release(first.lock_key)
    second = await asyncio.wait_for(waiting, 10)
    assert second.locks[0].user_id == "bob"
    with pytest.raises(LockConflictError, match="waited"):
        await store.request(ask("det1", user="carol", wait=0.3))


async def test_invalid_since_is_refused(store: Store) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        await store.events_after("yesterday")
    assert exc.value.field == "since"


async def test_tail_follows_every_event_in_order(store: Store, eventually) -> None:
    await store.request(ask("z"))
    since = await store.last_event_id()
    received: list[LockUpdateMessage] = []

    async def follow() -> None:
        async for msg in store.tail(since):
            received.append(msg)

    task = asyncio.create_task(follow())
    grant = await store.request(ask(["a", "b"]))
    await store.release(grant.lock_key, "a")
    try:
        await eventually(_length(received, 3))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert received == await store.events_after(since)
    assert sorted(actions(received)[:2]) == [("acquired", "a"), ("acquired", "b")]
    assert actions(received)[2] == ("released", "a")

    # Resuming from an id replays what came after it.
    replay: list[LockUpdateMessage] = []

    async def resume() -> None:
        async for msg in store.tail(received[0].event_id):
            replay.append(msg)

    task = asyncio.create_task(resume())
    try:
        await eventually(_length(replay, 2))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert replay == received[1:]


def _length(items: list[LockUpdateMessage], n: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return len(items) >= n
    return check


async def test_a_handshake_nobody_waits_for_times_out_at_its_deadline(store: Store) -> None:
    """The preemptor's request is gone mid-handshake (its replica died): the sweep times the
    displaced holder's handshake out at its deadline, as the preemptor would have."""
    store.preempt_ack_timeout = 2.0  # far beyond the steps before the first sweep, on a loaded CI
    holder = await store.request(ask("det1", QEXEC, "queue", timeout=30,
                                     acknowledge_preemption=True))
    preemptor = asyncio.ensure_future(store.request(ask("det1", MAINT, "maint")))

    async def displaced() -> DeviceLock:
        [lock] = [lk for lk in await store.all_locks() if lk.user_id == "queue"]
        return lock

    for _ in range(500):  # the grant is made; the answer waits for the acknowledgement
        if (await displaced()).preemption_ack == "pending":
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the preemption handshake never started")
    preemptor.cancel()  # nobody waits for the acknowledgement any more
    with contextlib.suppress(asyncio.CancelledError):
        await preemptor
    await store.sweep()
    pending = await displaced()
    assert pending.preemption_ack == "pending"  # not before its deadline
    assert pending.ack_deadline is not None
    await asyncio.sleep(max(0.0, pending.ack_deadline.timestamp() - await store.now()) + 0.1)
    await store.sweep()
    late = await displaced()
    assert late.preemption_ack == "timed_out"
    assert late.state is LockState.PREEMPTED and late.token == holder.locks[0].token
    timeouts = [e for e in await store.events_after(None) if e.action is LockAction.ACK_TIMEOUT]
    assert [e.device_name for e in timeouts] == ["det1"]
    await store.sweep()  # once only
    assert len([e for e in await store.events_after(None)
                if e.action is LockAction.ACK_TIMEOUT]) == 1
