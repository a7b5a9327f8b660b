"""What only the Redis store has to show: replicas sharing one Redis, racing sweepers,
persistence across a Redis crash, failing closed and healing, a trimmed log, no stored keys."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
import redis.asyncio as aioredis

from bs_coordination.errors import LockConflictError, StoreUnavailableError
from bs_coordination.models import LockAction, LockRequest, LockType, LockUpdateMessage
from bs_coordination.stores import EventGap
from bs_coordination.stores.redis import RedisStore
from bs_coordination.stores.redis_keys import KeySpace

pytestmark = pytest.mark.redis


def ask(name: str, user: str = "alice", lock_type: LockType = LockType.MANUAL_OPERATOR,
        **fields: object) -> LockRequest:
    return LockRequest.model_validate(
        {"device_name": name, "lock_type": lock_type, "user_id": user, **fields})


@pytest.fixture
async def replicas(redis_server):  # type: ignore[no-untyped-def]
    stores = [RedisStore(redis_server.url), RedisStore(redis_server.url)]
    for s in stores:
        await s.start()
    yield stores
    for s in stores:
        await s.close()


async def test_concurrent_requests_on_two_replicas_grant_each_device_once(replicas) -> None:
    devices = [f"motor{i}" for i in range(6)]
    attempts = [(replicas[i % 2], d, f"user{i}") for i, d in enumerate(devices * 10)]
    random.Random(7).shuffle(attempts)

    async def attempt(store: RedisStore, device: str, user: str) -> tuple[str, int] | None:
        try:
            grant = await store.request(ask(device, user))
        except LockConflictError:
            return None
        return (device, grant.locks[0].token)

    results = await asyncio.gather(*(attempt(*a) for a in attempts))
    granted = [r for r in results if r is not None]
    assert sorted(d for d, _ in granted) == devices
    assert len({t for _, t in granted}) == len(granted)
    a, b = [await s.all_locks() for s in replicas]
    assert a == b and [(lock.device_name, lock.token) for lock in a] == sorted(granted)
    acquired = [e for e in await replicas[1].events_after(None)
                if e.action is LockAction.ACQUIRED]
    assert sorted(e.device_name for e in acquired) == devices


async def test_waiting_workers_on_two_replicas_never_overlap(replicas) -> None:
    """Each worker holds the lock while it does a slow read-modify-write: a lost update would
    mean two holders at once."""
    shared = {"value": 0, "holders": 0, "max_holders": 0, "last_token": 0}

    async def worker(store: RedisStore, n: int) -> None:
        for _ in range(n):
            grant = await store.request(ask("stage", wait=30, timeout=30))
            token = grant.locks[0].token
            assert token > shared["last_token"]
            shared["last_token"] = token
            shared["holders"] += 1
            shared["max_holders"] = max(shared["max_holders"], shared["holders"])
            value = shared["value"]
            await asyncio.sleep(0)
            shared["value"] = value + 1
            shared["holders"] -= 1
            await store.release(grant.lock_key)

    await asyncio.gather(*(worker(replicas[i % 2], 5) for i in range(6)))
    assert shared["value"] == 30 and shared["max_holders"] == 1


async def test_racing_sweepers_announce_each_expiry_once(replicas) -> None:
    a, b = replicas
    for i in range(12):
        await a.request(ask(f"det{i}", lock_type=LockType.QUEUE_EXECUTING, timeout=0.2))
    swept = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while swept < 12:
        assert loop.time() < deadline, "leases were not swept"
        swept += sum(await asyncio.gather(a.sweep(), b.sweep(), a.sweep(), b.sweep()))
    assert swept == 12
    assert sum(await asyncio.gather(a.sweep(), b.sweep())) == 0
    expired = [e.device_name for e in await a.events_after(None)
               if e.action is LockAction.EXPIRED]
    assert sorted(expired) == sorted(f"det{i}" for i in range(12))


async def test_locks_survive_a_redis_crash_and_the_store_heals(redis_server) -> None:
    store = RedisStore(redis_server.url)
    await store.start()
    try:
        grant = await store.request(ask("det1", reason="scan"))
        redis_server.kill()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="lock store unavailable"):
            await store.request(ask("det2"))
        assert time.monotonic() - started < 5, "a request during an outage must fail fast"
        with pytest.raises(StoreUnavailableError):
            await store.ping()
        for read in (store.all_locks(), store.device_status("det1"), store.release(
                grant.lock_key), store.events_after(None), store.sweep()):
            with pytest.raises(StoreUnavailableError):
                await read

        redis_server.start()
        await store.ping()  # no restart of the store: the pool reconnects
        [lock] = await store.all_locks()
        assert lock.device_name == "det1" and lock.reason == "scan"
        other = RedisStore(redis_server.url)  # a new process on the same Redis sees it too
        try:
            assert [x.device_name for x in await other.all_locks()] == ["det1"]
            assert len(await other.release(grant.lock_key, "det1")) == 1
        finally:
            await other.close()
        assert (await store.request(ask("det2"))).locks[0].device_name == "det2"
    finally:
        await store.close()


async def test_unavailable_message_never_shows_the_password(redis_server) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    redis_server.kill()
    store = RedisStore(url)
    try:
        with pytest.raises(StoreUnavailableError) as exc:
            await store.request(ask("det1"))
        assert "s3cret-pw" not in exc.value.message
        assert f"127.0.0.1:{redis_server.port}" in exc.value.message
    finally:
        await store.close()


async def test_a_lease_that_ran_out_during_an_outage_expires_after(redis_server) -> None:
    store = RedisStore(redis_server.url)
    try:
        await store.request(ask("det1", lock_type=LockType.QUEUE_EXECUTING, timeout=0.5))
        redis_server.kill()
        await asyncio.sleep(0.6)  # the lease runs out while Redis is down
        redis_server.start()
        assert await store.all_locks() == []  # never reported once expired
        assert await store.sweep() == 1
        [event] = [e for e in await store.events_after(None) if e.action is LockAction.EXPIRED]
        assert event.device_name == "det1"
    finally:
        await store.close()


async def test_the_tail_survives_an_outage(redis_server) -> None:
    store = RedisStore(redis_server.url)
    received: list[LockUpdateMessage] = []

    async def follow() -> None:
        async for msg in store.tail("0"):
            received.append(msg)

    task = asyncio.create_task(follow())
    try:
        await store.request(ask("det1"))
        await _until(lambda: len(received) == 1)
        redis_server.kill()
        await asyncio.sleep(0.3)  # the tail notices and retries
        redis_server.start()
        await store.request(ask("det2"))
        await _until(lambda: len(received) == 2)
        assert [m.device_name for m in received] == ["det1", "det2"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


async def _until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_trimmed_log_is_a_gap(redis_server) -> None:
    store = RedisStore(redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for i in range(5):
            await store.request(ask(f"det{i}"))
        events = await store.events_after(None)
        await client.xtrim(KeySpace().events, maxlen=2, approximate=False)
        with pytest.raises(EventGap):
            await store.events_after(events[0].event_id)
        assert await store.events_after(events[3].event_id) == events[4:]
    finally:
        await client.aclose()
        await store.close()


async def test_lock_keys_are_never_stored(redis_server) -> None:
    store = RedisStore(redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        grants = [await store.request(ask(f"det{i}", timeout=60)) for i in range(3)]
        await store.request(ask("det0", "staff", LockType.MAINTENANCE))  # preempt: more events
        dump = []
        async for key in client.scan_iter():
            dump.append(key)
            dump.append(await client.dump(key) or b"")
        blob = b"".join(dump)
        for g in grants:
            assert g.lock_key.encode() not in blob
    finally:
        await client.aclose()
        await store.close()


async def test_open_store_selects_redis_by_url(redis_server) -> None:
    from bs_coordination.stores import open_store

    store = open_store(redis_server.url)
    try:
        assert isinstance(store, RedisStore) and store.kind == "redis"
        await store.start()
        await store.ping()
    finally:
        await store.close()


async def test_a_hung_redis_fails_requests_in_bounded_time(redis_server) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP) must not hang requests."""
    import signal

    store = RedisStore(redis_server.url, socket_timeout=0.5)
    try:
        grant = await store.request(ask("det1"))
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await store.request(ask("det2"))
            with pytest.raises(StoreUnavailableError):
                await store.ping()
            assert time.monotonic() - started < 5
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert len(await store.release(grant.lock_key)) == 1
        assert [lock.device_name for lock in await store.all_locks()] == []
    finally:
        await store.close()
