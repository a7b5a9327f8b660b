"""The Redis store's one-round-trip compare-and-swap: what a stale cache, a wrong local clock,
data without versions, an emptied Redis or cancelled callers must never cause."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from bs_coordination.errors import LockConflictError
from bs_coordination.locktable import LockRecord, hash_key
from bs_coordination.models import LockRequest, LockState, LockType
from bs_coordination.stores.redis import RedisStore

pytestmark = pytest.mark.redis


def ask(name: str, user: str = "alice", **fields: object) -> LockRequest:
    return LockRequest.model_validate(
        {"device_name": name, "lock_type": LockType.MANUAL_OPERATOR, "user_id": user, **fields})


async def script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_warm_request_and_release_are_one_round_trip_each(redis_server) -> None:
    store = RedisStore(redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        grant = await store.request(ask("det1"))  # learns the device, its key and the queue
        await store.release(grant.lock_key)
        before = await script_calls(client)
        grant = await store.request(ask("det1", timeout=30))
        assert await script_calls(client) - before == 1
        await store.release(grant.lock_key)
        assert await script_calls(client) - before == 2
    finally:
        await client.aclose()
        await store.close()


async def test_a_stale_cache_never_grants_a_held_device(redis_server) -> None:
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        grant = await b.request(ask("det1", "bob"))
        await b.release(grant.lock_key)  # b now believes det1 is free
        held = await a.request(ask("det1", "alice", reason="scan"))
        with pytest.raises(LockConflictError, match="alice") as refused:
            await b.request(ask("det1", "bob"))
        assert [lock.token for lock in refused.value.conflicts] == [held.locks[0].token]
        # b learnt the current state
        status = await b.device_status("det1")
        assert status.lock is not None and status.lock.reason == "scan"
        assert held.locks[0].token > grant.locks[0].token
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("skew", [-30.0, 30.0])
async def test_locks_carry_redis_time_when_the_local_estimate_is_off(redis_server,
                                                                     skew: float) -> None:
    """The store estimates Redis time locally; the script refuses an estimate that is off and
    the store resynchronises, so a lease is measured on Redis's clock."""
    store = RedisStore(redis_server.url)
    try:
        store._offset += skew  # as if the local clock had jumped since the last estimate
        grant = await store.request(ask("det1", timeout=60))
        redis_now = await store.now()
        acquired = grant.locks[0].acquired_at.timestamp()
        assert redis_now - 1.0 <= acquired <= redis_now
        assert grant.locks[0].expires_at is not None
        assert abs(grant.locks[0].expires_at.timestamp() - (acquired + 60)) < 1e-3
    finally:
        await store.close()


async def test_records_written_without_versions_are_seen(redis_server) -> None:
    """A lock stored by something that keeps no version (an earlier version of this store,
    in its layout: ``redis_migrate``) still blocks a request and can be released with its key."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    store = RedisStore(redis_server.url)
    try:
        lock_key = "an-old-key"
        rec = LockRecord(device_name="det1", lock_type=LockType.MANUAL_OPERATOR, user_id="old",
                         key_hash=hash_key(lock_key), token=7, acquired_at=time.time(),
                         expires_at=None, state=LockState.ACTIVE)
        await client.hset("bsc:rec:det1", rec.key_hash, json.dumps(rec.to_dict()))
        await client.sadd(f"bsc:key:{rec.key_hash}", "det1")
        await client.sadd("bsc:names", "det1")
        with pytest.raises(LockConflictError, match="old"):
            await store.request(ask("det1"))
        [released] = await store.release(lock_key)
        assert released.device_name == "det1" and released.token == 7
        assert (await store.request(ask("det1"))).locks[0].device_name == "det1"
    finally:
        await client.aclose()
        await store.close()


async def test_an_emptied_redis_is_not_mistaken_for_the_cached_state(redis_server) -> None:
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        mine = await a.request(ask("det1", "alice"))
        await client.flushall()
        theirs = await b.request(ask("det1", "bob"))  # det1 is free in the emptied Redis
        with pytest.raises(LockConflictError, match="bob"):
            await a.request(ask("det1", "carol"))
        assert [lock.user_id for lock in await a.all_locks()] == ["bob"]
        assert theirs.locks[0].device_name == "det1"
        with pytest.raises(Exception, match="No lock"):
            await a.release(mine.lock_key)
    finally:
        await client.aclose()
        await a.close()
        await b.close()


async def test_callers_cancelled_mid_call_leave_the_store_consistent(redis_server) -> None:
    store = RedisStore(redis_server.url)
    try:
        attempts = [asyncio.create_task(store.request(ask(f"det{i}"))) for i in range(40)]
        await asyncio.sleep(0)
        for task in attempts[::2]:
            task.cancel()
        results = await asyncio.gather(*attempts, return_exceptions=True)
        granted = {r.locks[0].device_name for r in results if not isinstance(r, BaseException)}
        stored = {lock.device_name for lock in await store.all_locks()}
        assert granted <= stored  # a cancelled caller may or may not have its lock stored
        for name in stored:  # whatever is stored, the store's own answers agree with it
            assert (await store.device_status(name)).locked
            with pytest.raises(LockConflictError):
                await store.request(ask(name, "bob"))
        fresh = await store.request(ask("other"))
        assert fresh.locks[0].token > max(lock.token for lock in await store.all_locks()
                                          if lock.device_name != "other")
    finally:
        await store.close()


async def test_heavy_contention_with_preemption_never_gives_up(redis_server) -> None:
    """Many workers on two replicas fight over a few overlapping devices, preempting each
    other: every operation gets an answer (no "busy"), nothing stays held after the releases,
    and on every device each grant's token is larger than the previous one's."""
    import random

    from bs_coordination.models import LockAction

    stores = [RedisStore(redis_server.url), RedisStore(redis_server.url)]
    devices = ["det0", "det1", "det0.cam", "det1.cam", "det2"]
    types = [LockType.MANUAL_OPERATOR, LockType.MAINTENANCE]
    granted = 0

    async def worker(i: int) -> None:
        nonlocal granted
        rnd = random.Random(i)
        store = stores[i % 2]
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        while loop.time() < end:
            req = LockRequest(device_name=rnd.choice(devices), lock_type=rnd.choice(types),
                              user_id=f"user{i}", timeout=30)
            try:
                grant = await store.request(req)
            except LockConflictError:
                continue
            granted += 1
            await asyncio.sleep(0)
            await store.release(grant.lock_key)

    try:
        await asyncio.gather(*(worker(i) for i in range(60)))
        assert granted > 0
        assert await stores[0].all_locks() == [] and await stores[1].all_locks() == []
        last: dict[str, int] = {}
        for event in await stores[0].events_after(None, limit=100_000):
            if event.action in (LockAction.ACQUIRED, LockAction.RESTORED, LockAction.UPGRADED):
                assert event.lock.token > last.get(event.device_name, 0)
                last[event.device_name] = event.lock.token
    finally:
        for s in stores:
            await s.close()
