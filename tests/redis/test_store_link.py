"""The Redis store's connections (``redis_url``) and its JSON texts (``redis_json``): every URL
form the store accepts reaches the right server, user and database; a wrong password fails
closed without showing it; what is written reads back as it was, every record field included."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bs_coordination.errors import StoreUnavailableError
from bs_coordination.locktable import TOKEN_COUNTER, Event, LockRecord, Waiter
from bs_coordination.models import LockAction, LockRequest, LockState, LockType, PreemptionAck
from bs_coordination.stores.base import to_message
from bs_coordination.stores.redis import RedisStore
from bs_coordination.stores.redis_json import event_json, filler, parse_event, parse_record, parse_waiter
from bs_coordination.stores.redis_keys import EVENT_FIELD, KeySpace
from bs_coordination.stores.txn_backend import decode, encode, placeholder

pytestmark = pytest.mark.redis


def ask(name: str, user: str = "alice") -> LockRequest:
    return LockRequest(device_name=name, lock_type=LockType.MANUAL_OPERATOR, user_id=user)


async def _use(store: RedisStore) -> None:
    """A grant, its event on the tail, a release."""
    received = []

    async def follow() -> None:
        async for msg in store.tail("0"):
            received.append(msg)

    task = asyncio.create_task(follow())
    try:
        grant = await store.request(ask("det1"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not received:
            assert loop.time() < deadline, "the tail saw nothing"
            await asyncio.sleep(0.02)
        assert received[0].device_name == "det1" and received[0].lock == grant.locks[0]
        assert len(await store.release(grant.lock_key)) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_password_a_user_and_a_database_in_the_url(redis_server) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.acl_setuser("carol", enabled=True, passwords=["+pw-carol"], keys=["*"],
                            channels=["*"], commands=["+@all"])
    await admin.config_set("requirepass", "pw-default")
    store = RedisStore(f"redis://carol:pw-carol@127.0.0.1:{redis_server.port}/4")
    other = RedisStore(f"redis://:pw-default@127.0.0.1:{redis_server.port}/5")
    wrong = RedisStore(f"redis://carol:not-the-pw@127.0.0.1:{redis_server.port}/4")
    check = aioredis.Redis.from_url(f"redis://:pw-default@127.0.0.1:{redis_server.port}/4")
    try:
        await _use(store)
        await _use(other)
        assert await check.xlen(KeySpace().events) == 2  # acquired, released: in database 4
        with pytest.raises(StoreUnavailableError) as refused:
            await wrong.request(ask("det2"))
        assert "not-the-pw" not in refused.value.message
    finally:
        for s in (store, other, wrong):
            await s.close()
        await check.aclose()
        await admin.aclose()


async def test_a_unix_socket_url(redis_server, tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [redis_server.binary, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path),
         "--save", "", "--requirepass", "pw"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "redis-server made no socket"
            await asyncio.sleep(0.02)
        store = RedisStore(f"unix://:pw@{sock}?db=2")
        check = aioredis.Redis(unix_socket_path=str(sock), password="pw", db=2)
        try:
            await _use(store)
            assert await check.xlen(KeySpace().events) == 2
        finally:
            await store.close()
            await check.aclose()
    finally:
        proc.terminate()
        proc.wait(10)


RECORDS = [
    LockRecord("det1", LockType.MANUAL_OPERATOR, "alice", "ab" * 32, 7, 1_700_000_000.123456,
               None),
    LockRecord("det1.cam", LockType.QUEUE_EXECUTING, 'bé "quoted" \\ \u2028 😀', "cd" * 32,
               2**40, 1_700_000_000.5, 1_700_000_300.25, reason="scan \n tab\t",
               plan_uid="plan-1", state=LockState.PREEMPTED,
               preempted_by={"device_name": "det1", "lock_type": "MAINTENANCE", "priority": 0,
                             "user_id": "staff", "reason": "fix ü", "plan_uid": None,
                             "acquired_at": "2023-11-14T22:13:20Z", "expires_at": None},
               ack_requested=True, ack=PreemptionAck.ACKNOWLEDGED, ack_deadline=1_700_000_002.5,
               acknowledged_at=1_700_000_001.25),
]


@pytest.mark.parametrize("rec", RECORDS)
def test_records_and_events_read_back_as_written(rec: LockRecord) -> None:
    key = f"r:{rec.device_name}"
    assert decode(key, encode(key, {rec.key_hash: rec})) == {rec.key_hash: rec}
    assert parse_record(json.dumps(rec.to_dict())) == rec  # as the old layout kept it
    for action in LockAction:
        event = Event(action, rec, 1_700_000_001.75, actor="op ü")
        json_text = event_json(event)
        assert rec.key_hash not in json_text
        assert parse_event("1-2", {EVENT_FIELD: json_text}) == to_message(event, "1-2")


def test_the_event_of_a_grant_holds_a_hole_for_its_token() -> None:
    """A grant's event is made before its token is known: the text has a hole where the
    number goes (the commit script fills it in), and nothing else changes."""
    rec = RECORDS[1]
    held = replace(rec, token=placeholder(TOKEN_COUNTER, 2))
    text = event_json(Event(LockAction.ACQUIRED, held, 1_700_000_001.75, actor=None))
    assert '"token":\x012\x01' in text
    filled = text.replace("\x012\x01", str(1_700_000_000_000_001))
    real = Event(LockAction.ACQUIRED, replace(rec, token=1_700_000_000_000_001), 1_700_000_001.75,
                 actor=None)
    assert parse_event("1-2", {EVENT_FIELD: filled}) == to_message(real, "1-2")
    assert filler(1_700_000_000_000_000)(held.token) == 1_700_000_000_000_001


def test_every_record_field_is_stored() -> None:
    """Records are stored through ``to_dict``/``from_dict``: a field the lock table adds is kept
    with no change to the Redis store (each field here differs from its default)."""
    rec = RECORDS[1]
    defaults = LockRecord("x", LockType.MANUAL_OPERATOR, "u", "k", 0, 0.0, None)
    changed = [f.name for f in fields(LockRecord) if not f.name.startswith("_")
               and getattr(rec, f.name) == getattr(defaults, f.name)]
    assert changed == [], f"give these fields a non-default value in RECORDS[1]: {changed}"
    key = f"r:{rec.device_name}"
    assert decode(key, encode(key, {rec.key_hash: rec})) == {rec.key_hash: rec}


def test_events_appended_before_the_event_format_still_read() -> None:
    event = Event(LockAction.ACQUIRED, RECORDS[1], 1_700_000_001.75, actor=None)
    old = to_message(event, "").model_dump_json(exclude={"event_id"})
    assert parse_event("5-1", {"m": old}) == to_message(event, "5-1")


def test_waiters_read_back_as_written() -> None:
    w = Waiter(12, ("det1", "m1.x"), 1, 1_700_000_123.5)
    assert decode("w", encode("w", {12: w})) == {12: w}
    assert parse_waiter(json.dumps(w.to_dict())) == w  # as the old layout kept it


async def test_any_text_survives_the_script(redis_server) -> None:
    """Users and reasons with quotes, backslashes, control characters and characters
    outside the BMP go through the script's JSON arguments and come back as they were."""
    odd = 'bé "q" \\ \u2028 \x01 😀'
    store = RedisStore(redis_server.url)
    other = RedisStore(redis_server.url)  # reads what the first wrote, not its own cache
    try:
        grant = await store.request(LockRequest(
            device_name="det_1-a:x", lock_type=LockType.MAINTENANCE, user_id=odd,
            reason=odd + "\n"))
        [lock] = await other.all_locks()
        assert (lock.device_name, lock.user_id, lock.reason) == ("det_1-a:x", odd, odd + "\n")
        assert lock == grant.locks[0]
        [event] = await other.events_after(None)
        assert event.lock == grant.locks[0]
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:  # the stream itself holds the real token (the script filled it in)
            [(_, entry)] = await raw.xrange(KeySpace().events)
            assert json.loads(entry[EVENT_FIELD])["lock"]["token"] == grant.locks[0].token
        finally:
            await raw.aclose()
        assert len(await other.release(grant.lock_key)) == 1
    finally:
        await store.close()
        await other.close()
