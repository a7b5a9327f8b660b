"""Three Redis store replicas under random load: replaying the one event log, no device is ever
held actively by two holders, and every preempted lock is displaced by a higher priority.

Workers on three ``RedisStore`` instances (as three service replicas) request random devices
of a small hierarchy with every lock type, some waiting, some with leases short enough to
expire under the sweepers, and release most of what they get. Each request has a holder name
of its own, so the log says which lock every event is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from bs_coordination.errors import CoordinationError, LockConflictError
from bs_coordination.models import LockAction, LockRequest, LockState, LockType, names_overlap
from bs_coordination.service.tasks import stop
from bs_coordination.stores.redis import RedisStore

pytestmark = pytest.mark.redis

DEVICES = ["det1", "det1.cam", "det1.cam.roi", "det2", "m1", "m1.user_setpoint"]
GONE = {LockAction.RELEASED, LockAction.EXPIRED, LockAction.FORCE_RELEASED, LockAction.CONSUMED}


async def test_replicas_never_hand_one_device_to_two_holders(redis_server) -> None:
    stores = [RedisStore(redis_server.url) for _ in range(3)]
    answered = granted = 0

    async def sweeper(store: RedisStore) -> None:
        while True:
            with contextlib.suppress(CoordinationError):
                await store.sweep()
            await asyncio.sleep(0.05)

    async def worker(i: int) -> None:
        nonlocal answered, granted
        rnd = random.Random(i)
        store = stores[i % len(stores)]
        loop = asyncio.get_running_loop()
        end, n = loop.time() + 3.0, 0
        while loop.time() < end:
            n += 1
            lock_type = rnd.choice(list(LockType))
            names: list[str] = []
            for name in rnd.sample(DEVICES, rnd.choice([1, 1, 1, 2])):
                if not any(names_overlap(name, other) for other in names):
                    names.append(name)
            req = LockRequest(
                device_names=names, lock_type=lock_type, user_id=f"w{i}-{n}",
                timeout=rnd.choice([0.2, 0.5, 5.0]) if lock_type.needs_lease or rnd.random() < 0.7
                else None,
                wait=rnd.choice([0, 0, 0.2]), reason="stress")
            try:
                grant = await store.request(req)
            except LockConflictError:
                answered += 1
                continue
            answered += 1
            granted += 1
            await asyncio.sleep(rnd.choice([0, 0.01, 0.05]))
            if rnd.random() < 0.8 or req.timeout is None:
                with contextlib.suppress(CoordinationError):  # it may have expired meanwhile
                    await store.release(grant.lock_key)

    sweepers = [asyncio.create_task(sweeper(s)) for s in stores]
    workers = [asyncio.create_task(worker(i)) for i in range(45)]
    try:
        await asyncio.gather(*workers)
        await asyncio.sleep(5.5)  # every lease left runs out and the sweepers expire it
        assert answered > 100 and granted > 20
        for store in stores:
            assert await store.all_locks() == []

        # Replay the one log (stream order is commit order) and check every prefix of it.
        live: dict[tuple[str, str], tuple[LockType, LockState]] = {}
        last_token: dict[str, int] = {}
        events = await stores[0].events_after(None, limit=1_000_000)
        assert events and events == await stores[2].events_after(None, limit=1_000_000)
        for event in events:
            lock = event.lock
            who = (lock.device_name, lock.user_id)
            if event.action in GONE:
                assert who in live, f"{event.action.value} of a lock never granted: {who}"
                del live[who]
            else:
                live[who] = (lock.lock_type, lock.state)
            if event.action in (LockAction.ACQUIRED, LockAction.RESTORED, LockAction.UPGRADED):
                assert lock.token > last_token.get(lock.device_name, 0), event
                last_token[lock.device_name] = lock.token
            if event.action is LockAction.PREEMPTED:
                assert lock.preempted_by is not None
                assert lock.preempted_by.priority < lock.priority, event
            active = [(d, u) for (d, u), (_, state) in live.items() if state is LockState.ACTIVE]
            for k, (d1, u1) in enumerate(active):
                for d2, u2 in active[k + 1:]:
                    assert u1 == u2 or not names_overlap(d1, d2), (
                        f"after event {event.event_id}: {d1!r} held by {u1} and {d2!r} by {u2}")
        assert live == {}
    finally:
        for task in (*workers, *sweepers):  # again while one runs on: see service/tasks.py
            await stop(task)
        for store in stores:
            await store.close()
