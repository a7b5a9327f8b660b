"""A Redis holding a lock table in the layout of the store before the transaction engine
(``redis_keys`` describes both; ``redis_migrate`` moves it) keeps its locks, its queue, its
event log and its fencing-token order when the new version starts on it; a replica still
running the old version can no longer write to it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from bs_coordination.errors import CoordinationError, LockConflictError
from bs_coordination.locktable import LockRecord, Waiter, hash_key
from bs_coordination.models import LockRequest, LockType
from bs_coordination.stores.redis import RedisStore

pytestmark = pytest.mark.redis


def ask(name: str, user: str, **fields: object) -> LockRequest:
    return LockRequest.model_validate(
        {"device_name": name, "lock_type": LockType.MANUAL_OPERATOR, "user_id": user, **fields})


async def write_old_table(client: aioredis.Redis, now: float) -> tuple[int, int]:
    """The keys the old store wrote for: alice holding det1, bob holding det2.cam with a lease,
    carol queued for det1, one event; returns (the highest token, the token counter)."""
    base = int(now * 1_000_000)
    alice = LockRecord("det1", LockType.MANUAL_OPERATOR, "alice", hash_key("alice-key"), base + 3,
                       now - 10, None, reason="overnight scan")
    bob = LockRecord("det2.cam", LockType.MANUAL_OPERATOR, "bob", hash_key("bob-key"), base + 7,
                     now - 5, now + 600)
    carol = Waiter(4, ("det1",), LockType.MANUAL_OPERATOR.priority, now + 600)
    versions: dict[str, str] = {"~epoch": "old-epoch", "~last": str(base + 20)}
    for rec in (alice, bob):
        key = f"bsc:rec:{rec.device_name}"
        # as ``record_json`` wrote it: the token first
        fields = {k: v for k, v in rec.to_dict().items() if k != "token"}
        text = f'{{"token":{rec.token},' + json.dumps(fields, separators=(",", ":"))[1:]
        await client.hset(key, rec.key_hash, text)
        await client.sadd(f"bsc:key:{rec.key_hash}", rec.device_name)
        await client.sadd("bsc:names", rec.device_name)
        versions[key] = str(base + 10)
        versions[f"bsc:key:{rec.key_hash}"] = str(base + 10)
    await client.sadd("bsc:under:det2", "det2.cam")
    await client.zadd("bsc:expiry", {f"det2.cam {bob.key_hash}": bob.expires_at})
    await client.hset("bsc:waiters", "4", json.dumps(carol.to_dict()))
    versions["bsc:under:det2"] = versions["bsc:waiters"] = str(base + 11)
    await client.hset("bsc:versions", mapping=versions)
    await client.set("bsc:counter:token", str(base + 9))
    await client.set("bsc:counter:ticket", "4")
    event = {"action": "acquired", "timestamp": now - 5, "actor": None,
             "lock": {k: v for k, v in bob.to_dict().items() if k != "key_hash"}}
    await client.xadd("bsc:events", {"e": json.dumps(event)})
    return bob.token, base + 9


async def test_locks_of_the_old_layout_survive_the_upgrade(redis_server) -> None:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    stores = [RedisStore(redis_server.url), RedisStore(redis_server.url)]
    try:
        highest, counter = await write_old_table(client, time.time())
        # Two replicas of the new version start at once: one moves the table, neither loses it.
        await asyncio.gather(*(s.start() for s in stores))
        a, b = stores
        for store in stores:
            locks = {lock.device_name: lock for lock in await store.all_locks()}
            assert sorted(locks) == ["det1", "det2.cam"]
            assert locks["det1"].user_id == "alice" and locks["det1"].reason == "overnight scan"
            assert locks["det2.cam"].token == highest and locks["det2.cam"].expires_at is not None
        with pytest.raises(LockConflictError, match="alice"):
            await a.request(ask("det1", "dave"))
        with pytest.raises(LockConflictError, match="bob"):  # the hierarchy came along
            await b.request(ask("det2", "dave"))
        [old_event] = await a.events_after(None)
        assert old_event.device_name == "det2.cam" and old_event.lock.user_id == "bob"

        # Released with the old lock key; carol, queued before, still goes first.
        [released] = await b.release("alice-key")
        assert released.device_name == "det1"
        with pytest.raises(CoordinationError):
            await a.request(ask("det1", "dave"))
        grant = await a.request(ask("det9", "erin"))
        assert grant.locks[0].token > max(highest, counter)
        assert len(await a.release("bob-key")) == 1

        # Nothing of the old layout is left but the marker that stops an old replica.
        left = sorted([k async for k in client.scan_iter()])
        assert not [k for k in left if k.split(":")[1] in ("rec", "under", "key", "counter",
                                                           "waiters")], left
        assert await client.type("bsc:versions") == "string"
        with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
            await client.hget("bsc:versions", "~epoch")  # the old store's first call
        assert a.data_losses == b.data_losses == 0
    finally:
        for s in stores:
            await s.close()
        await client.aclose()
