"""The transaction engine (``stores/txn.py``) against a plain model: a dict of versioned texts
that checks and writes atomically, with random delays so the replicas interleave.

Several engines (replicas) share one model and run random lock operations concurrently. Every
commit names the operations it carried (in order); replaying exactly those operations serially
on the memory store must give the same outcome for each, the same events in the same order (per device) and
the same final table. Operations decided without a commit (refusals read on one snapshot) must
be refusals or reads that changed nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Collection
from typing import Any

import pytest

from bs_coordination import locktable
from bs_coordination.errors import CoordinationError
from bs_coordination.locktable import LockRecord, Txn
from bs_coordination.models import LockRequest, LockType
from bs_coordination.stores import ManualClock, MemoryStore
from bs_coordination.stores.txn import ABSENT, Commit, Engine, Outcome, Stored, patch, unplace

NAMES = ["a", "a.x", "a.y", "a.x.q", "b", "c"]
USERS = ["u1", "u2", "u3"]


class Model:
    """The plainest backend: texts with versions in a dict, one revision for the whole
    table. ``read`` and ``commit`` wait a random while before they act (atomically)."""

    def __init__(self, rng: random.Random, assigns: bool = False) -> None:
        self.rng = rng
        #: Assign tokens and tickets from the revision (as the etcd store does), rather than
        #: having the engine keep counters as keys.
        self.assigns = assigns
        self.data: dict[str, tuple[int, str]] = {}
        self.revision = 0
        self.events: list[tuple[int, Any]] = []
        self.expiry: dict[tuple[str, str], float] = {}
        self.committed: list[list[Any]] = []  # the tags of each commit that held, in order

    async def _pause(self) -> None:
        await asyncio.sleep(self.rng.choice([0, 0, 0, 0.0005, 0.001, 0.002]))

    async def read(self, keys: Collection[str]) -> dict[str, Stored]:
        await self._pause()
        return {k: self.data.get(k, (ABSENT, None)) for k in keys}

    async def commit(self, commit: Commit) -> Outcome:
        await self._pause()
        if any(self.data.get(k, (ABSENT, None))[0] != v for k, v in commit.checks.items()):
            return Outcome(False, snapshot={k: self.data.get(k, (ABSENT, None)) for k in commit.checks})
        self.revision += 1
        versions = {}
        for key, text in commit.writes.items():
            if text is None:
                self.data.pop(key, None)
                versions[key] = ABSENT
            else:
                self.data[key] = (self.revision, text)
                versions[key] = self.revision
        for name, key_hash, _old, new in commit.expiry:
            if new is None:
                self.expiry.pop((name, key_hash), None)
            else:
                self.expiry[(name, key_hash)] = new
        fill = self.filler(self.revision) if self.assigns else None
        self.events.extend(commit.events if fill is None else patch(commit.events, fill))
        self.committed.append(commit.tags)
        return Outcome(True, versions=versions, fill=fill,
                       event_ids=[f"{self.revision}-{n}" for n, _ in commit.events])

    def filler(self, version: Any) -> Callable[[int], int]:
        def fill(value: int) -> int:
            counter, n = unplace(value) or ("", 0)
            assert counter and n < 1024
            return (10**9 if counter == "token" else 0) + version * 1024 + n
        return fill


Op = Callable[[Txn], Any]


def random_ops(rng: random.Random, client: int, count: int) -> list[tuple[str, Op]]:
    """``count`` operations of one client; keys are the client's own (``k<client>-<n>``)."""
    ops: list[tuple[str, Op]] = []
    keys = [locktable.hash_key(f"k{client}-{n}") for n in range(4)]
    for i in range(count):
        kind = rng.choice(["request", "request", "request", "release", "renew", "force", "status"])
        key = rng.choice(keys)
        if kind == "request":
            names = rng.sample(NAMES, rng.choice([1, 1, 2]))
            if any(locktable.names_overlap(a, b) for a in names for b in names if a != b):
                names = names[:1]
            req = LockRequest(device_names=names, lock_type=rng.choice(list(LockType)),
                              user_id=f"u{client}", timeout=3600,
                              plan_uid=rng.choice([None, "p1", "p2"]))
            presented = rng.random() < 0.3

            def op(txn: Txn, req: LockRequest = req, key: str = key, presented: bool = presented) -> Any:
                return locktable.request(txn, req, key, presented=presented)
        elif kind == "release":
            name = rng.choice([None, *NAMES])

            def op(txn: Txn, key: str = key, name: str | None = name) -> Any:
                return locktable.release(txn, key, name)
        elif kind == "renew":
            def op(txn: Txn, key: str = key) -> Any:
                return locktable.renew(txn, key, 7200)
        elif kind == "force":
            name = rng.choice(NAMES)

            def op(txn: Txn, name: str = name) -> Any:
                return locktable.force_release(txn, name)
        else:
            name = rng.choice(NAMES)

            def op(txn: Txn, name: str = name) -> Any:
                return locktable.device_status(txn, name)
        ops.append((f"{client}:{i}:{kind}", op))
    return ops


def outcome(result: Any) -> Any:
    """What an operation answered, tokens left out (the two stores number from elsewhere)."""
    if isinstance(result, BaseException):
        return type(result).__name__
    if isinstance(result, tuple):  # device_status
        return tuple(outcome(part) for part in result)
    if isinstance(result, list):
        return sorted((r.device_name, r.user_id, r.lock_type, r.state) for r in result)
    if isinstance(result, LockRecord):
        return (result.device_name, result.user_id, result.lock_type, result.state)
    return result


def shape(records: list[LockRecord]) -> list[tuple[Any, ...]]:
    order = {t: i for i, t in enumerate(sorted({r.token for r in records}))}
    return sorted((r.device_name, r.user_id, r.lock_type, r.state, order[r.token]) for r in records)


@pytest.mark.parametrize("assigns", [False, True], ids=["counter-keys", "backend-counters"])
@pytest.mark.parametrize("seed", range(10))
async def test_concurrent_replicas_match_the_memory_store_run_serially(seed: int, assigns: bool) -> None:
    rng = random.Random(seed)
    model = Model(rng, assigns)
    clock = ManualClock()
    engines = [Engine(model, clock.now, assigns_counters=assigns) for _ in range(3)]
    clients = {c: random_ops(rng, c, 30) for c in range(8)}
    results: dict[str, Any] = {}
    appended: dict[str, list[Any]] = {}

    async def client(c: int) -> None:
        engine = engines[c % len(engines)]
        for tag, op in clients[c]:
            try:
                results[tag], appended[tag] = await engine.run(op, actor=f"u{c}", tag=tag)
            except CoordinationError as exc:
                results[tag] = exc
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    await asyncio.gather(*(client(c) for c in clients))
    assert sum(e.commits for e in engines) >= 1

    # Replay what was committed, in commit order, on the memory store.
    ops = {tag: op for ops in clients.values() for tag, op in ops}
    memory = MemoryStore(clock=clock)
    replayed: set[str] = set()
    for tags in model.committed:
        for tag in tags:
            try:
                expected, _ = await memory._transact(ops[tag], actor=f"u{tag.split(':')[0]}")
            except CoordinationError as exc:
                expected = exc
            assert outcome(results[tag]) == outcome(expected), tag
            replayed.add(tag)
    # Decided without a commit (on one snapshot): refusals, reads, or requests and renewals
    # that found nothing to change.
    assert replayed
    for tag in results.keys() - replayed:
        assert appended.get(tag, []) == [], tag

    memory_events = [(e.action, e.device_name, e.lock.user_id)
                     for e in await memory.events_after(None, limit=100_000)]
    model_events = [(e.action, e.record.device_name, e.record.user_id) for _, e in model.events]
    # One order per device; one operation's events on several devices may come in any order
    # (the lock table iterates a set of names there).
    for name in NAMES:
        assert [e for e in model_events if e[1] == name] == [e for e in memory_events if e[1] == name]
    assert len(model_events) == len(memory_events)
    if not assigns:
        assert [n for n, _ in model.events] == list(range(1, len(model.events) + 1))

    stored = [patch(LockRecord.from_dict(d), model.filler(version)) if assigns else LockRecord.from_dict(d)
              for key, (version, text) in model.data.items() if key.startswith("r:")
              for d in json.loads(text)]
    assert shape(stored) == shape(await memory._all_records())
    # Tokens only ever increase, in commit order.
    tokens = [e.record.token for _, e in model.events if e.action.value in ("acquired", "restored", "upgraded")]
    assert tokens == sorted(tokens)
    for engine in engines:
        await engine.close()


class Refusing(Model):
    """A model that refuses every other commit (as if another replica had just written)."""

    refuse = False

    async def commit(self, commit: Commit) -> Outcome:
        self.refuse = not self.refuse
        if self.refuse:
            return Outcome(False, snapshot={k: self.data.get(k, (ABSENT, None)) for k in commit.checks})
        return await super().commit(commit)


async def test_a_batch_larger_than_a_commit_is_split() -> None:
    """Many concurrent grants on one process: committed in several commits, each small, every
    one of them after a refused attempt; none is lost."""
    model = Refusing(random.Random(0))
    clock = ManualClock()
    engine = Engine(model, clock.now, max_ops=20)
    names = [f"dev{i}" for i in range(40)]

    def grant(name: str) -> Op:
        req = LockRequest(device_name=name, lock_type=LockType.MANUAL_OPERATOR, user_id="u", timeout=60)
        return lambda txn: locktable.request(txn, req, locktable.hash_key(name), presented=False)

    results = await asyncio.gather(*(engine.run(grant(n), tag=n) for n in names))
    assert sorted(r[0][0].device_name for r in results) == sorted(names)
    assert len(model.committed) > 1
    assert sorted(t for tags in model.committed for t in tags) == sorted(names)
    tokens = [r[0][0].token for r in results]
    assert len(set(tokens)) == len(tokens)
    await engine.close()


@pytest.mark.parametrize("in_flight", [1, 3])
async def test_operations_one_after_another_are_each_served(in_flight: int) -> None:
    """An operation that arrives just as the previous commit's worker finishes is served."""
    engine = Engine(Model(random.Random(0)), ManualClock().now, max_in_flight=in_flight)

    def grant(name: str) -> Op:
        req = LockRequest(device_name=name, lock_type=LockType.MANUAL_OPERATOR, user_id="u", timeout=60)
        return lambda txn: locktable.request(txn, req, locktable.hash_key(name), presented=False)

    async def one_after_another() -> list[str]:
        return [(await engine.run(grant(f"d{i}")))[0][0].device_name for i in range(20)]

    assert await asyncio.wait_for(one_after_another(), 5) == [f"d{i}" for i in range(20)]
    await engine.close()
