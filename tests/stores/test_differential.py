"""The Redis store behaves exactly as the memory store: random operation sequences (hierarchy,
preemption, upgrades, atomic sets, releases, renewals, force releases) run on both, and every
outcome, every lock and every event must agree. Tokens are compared by order only: Redis may
skip values it reserved for a refused request."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bs_coordination.errors import CoordinationError
from bs_coordination.models import DeviceLock, LockRequest, LockType
from bs_coordination.stores import MemoryStore, Store
from bs_coordination.stores.redis import RedisStore

pytestmark = pytest.mark.redis

NAMES = ["a", "a.x", "a.y", "a.x.q", "b"]
USERS = ["u1", "u2"]
_prefixes = itertools.count()

request_op = st.tuples(
    st.just("request"),
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True),
    st.sampled_from(list(LockType)),
    st.sampled_from(USERS),
    st.one_of(st.none(), st.integers(0, 5)),  # present the key of an earlier grant
    st.sampled_from([None, "p1", "p2"]),
)
release_op = st.tuples(st.just("release"), st.integers(0, 5),
                       st.one_of(st.none(), st.sampled_from(NAMES)))
renew_op = st.tuples(st.just("renew"), st.integers(0, 5))
force_op = st.tuples(st.just("force"), st.sampled_from(NAMES))
operations = st.lists(st.one_of(request_op, request_op, release_op, renew_op, force_op),
                      min_size=1, max_size=25)


def _overlap(names: list[str]) -> bool:
    return any(a == b or b.startswith(a + ".") or a.startswith(b + ".")
               for a, b in itertools.combinations(names, 2))


async def _apply(store: Store, ops: list[tuple], keys: list[str]) -> list[object]:  # type: ignore[type-arg]
    out: list[object] = []
    for op in ops:
        try:
            if op[0] == "request":
                _, names, lock_type, user, key_index, plan = op
                if _overlap(names):
                    continue
                key = keys[key_index] if key_index is not None and key_index < len(keys) else None
                grant = await store.request(LockRequest(
                    device_names=names, lock_type=lock_type, user_id=user, timeout=3600,
                    plan_uid=plan, lock_key=key))
                if grant.lock_key not in keys:
                    keys.append(grant.lock_key)
                out.append(("granted", sorted(lock.device_name for lock in grant.locks)))
            elif op[0] == "release":
                key = keys[op[1]] if op[1] < len(keys) else "no-such-key"
                out.append(("released", sorted(r.device_name for r in
                                               await store.release(key, op[2]))))
            elif op[0] == "renew":
                key = keys[op[1]] if op[1] < len(keys) else "no-such-key"
                out.append(("renewed", sorted(r.device_name for r in
                                              await store.renew(key, 7200))))
            else:
                out.append(("forced", sorted(r.user_id for r in
                                             await store.force_release(op[1]))))
        except CoordinationError as exc:
            out.append(type(exc).__name__)
    return out


def _shape(locks: list[DeviceLock]) -> list[tuple[object, ...]]:
    order = {t: i for i, t in enumerate(sorted({lock.token for lock in locks}))}
    return [(lock.device_name, lock.user_id, lock.lock_type, lock.state, lock.plan_uid,
             order[lock.token], lock.preempted_by.user_id if lock.preempted_by else None)
            for lock in locks]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=operations)
def test_redis_matches_memory(redis_server, ops) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        memory = MemoryStore()
        redis = RedisStore(redis_server.url, prefix=f"diff{next(_prefixes)}")
        try:
            expected = await _apply(memory, ops, [])
            got = await _apply(redis, ops, [])
            assert got == expected
            assert _shape(await redis.all_locks()) == _shape(await memory.all_locks())
            for name in NAMES:
                m, r = await memory.device_status(name), await redis.device_status(name)
                assert (r.locked, _shape(r.preempted), sorted(_shape(r.component_locks))) == (
                    m.locked, _shape(m.preempted), sorted(_shape(m.component_locks)))
            m_events = [(e.device_name, e.action, e.lock.user_id, e.lock.lock_type)
                        for e in await memory.events_after(None)]
            r_events = [(e.device_name, e.action, e.lock.user_id, e.lock.lock_type)
                        for e in await redis.events_after(None)]
            # One order per device; across devices, one operation's events may come in any
            # order (both stores iterate a set of names there).
            for name in NAMES:
                assert [e for e in r_events if e[0] == name] == [
                    e for e in m_events if e[0] == name]
            assert len(r_events) == len(m_events)
        finally:
            await redis.close()

    asyncio.run(run())
