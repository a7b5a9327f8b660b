"""The optimistic transaction engine every networked store runs the lock table on.

A networked store keeps the lock table in a key-value service that can compare versions and
write several keys atomically (etcd's ``Txn``; a Redis script or ``WATCH``/``MULTI``). This
module holds everything about running ``locktable`` on such a service that does not depend
on which service it is; a store supplies a ``Backend`` with two calls and gets the rest.

**Keys.** The table is a handful of *logical keys*, each holding one value as text:

============================ =====================================================
``r:<device name>``           the records on exactly that name (JSON list, oldest first)
``u:<device name>``           names strictly below it that hold records (JSON list)
``k:<key hash>``              names holding a record under that lock key (JSON list)
``w``                         the wait queue (JSON list of waiters)
``c:<counter>``               a counter: ``token`` (fencing), ``ticket``, ``event``
============================ =====================================================

A backend maps a logical key to its own key (etcd: ``<prefix>/t/<logical key>``; Redis:
``<prefix>:t:<logical key>``) and gives each stored value a *version* that changes whenever the
value does (etcd: the key's ``mod_revision``; Redis: the commit's, kept with the value;
``ABSENT`` (0) when the key does not exist).

**An operation** (``Engine.run(op)``; ``op`` is a function of a ``locktable.Txn``):

1. *read*: the lock table runs on a ``TableView`` answered from a snapshot of the backend
   (the previous attempt's reply) or else from this process's cache of what it last saw (a
   key never seen is guessed absent); every key read is noted with the version it was read at;
2. *run the rules*: ``op(txn)`` returns a result or raises a ``CoordinationError`` (refused);
3. *commit*: ``Backend.commit`` writes the changed keys, the events and the expiry index
   **only if every key read still has the version it was read at**, atomically;
4. *on a conflict* the backend answers with the current value of the keys it checked (all
   read at one instant, after the checks failed), and the operation runs again on that
   (``MAX_ATTEMPTS``, and at least ``BUSY_SECONDS``, before it fails as "busy"). A refusal
   is confirmed by a commit of its checks alone, unless every key it read came from the
   snapshot of this attempt (then it was true at that instant, during the request, and no
   call is needed).

**Group commit.** Operations that arrive while a commit is in flight wait for it and then run
together, one after the other on the same view (each sees what the earlier ones wrote), and
commit in one ``Backend.commit``. So one process has one commit in flight (``max_in_flight``
allows more), its operations never conflict with each other, and N concurrent requests cost
one round trip. Operations of other processes are met by the version checks. A batch is cut
where a commit would pass the backend's size (``max_ops``); an operation too large alone is
refused by the backend (a ``CoordinationError``, for it alone).

**Counters** (fencing tokens, wait tickets) come in two ways. By default they are keys like
any other (``c:token``), read, checked and written: simple, but every grant then conflicts with
every concurrent grant of another process, whatever the device. With
``Engine(assigns_counters=True)`` the lock table is handed *placeholders* (``placeholder``),
never read from the backend; the backend assigns the real values when it commits (etcd from the
commit's revision, Redis from the commit's version) and answers ``Outcome.fill``, which the
engine applies to the results, the events and its cache (``patch``); a value the backend stored
with placeholders is filled when read (``Backend.filler(version)``). Counters never go back:
``Engine.floor`` holds a value a counter kept as a key is never taken below. **Events** are
numbered by the ``event`` counter in the same commit (or, with backend counters, from 0 within
the commit); the backend stores them and names their ids.

**Time** is the store's: ``clock()`` is called once per attempt (see the store's docstring for
where its time comes from); the commit carries it (``Commit.now``) for a backend that checks
it against the service's own clock.

A backend implements ``Backend`` (``txn_backend``, with the keys, their texts, ``Commit`` and
``Outcome``): ``read(keys)`` (a consistent snapshot) and ``commit(commit)``
(``Outcome``), raising ``StoreUnavailableError`` when the service cannot be used (the operations
of that commit fail with it; nothing is known to be written) or ``Restart`` to make the engine
drop its cache and run the batch again (e.g. after it re-attached to a table that was lost).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bs_coordination.errors import CoordinationError, StoreUnavailableError
from bs_coordination.locktable import (
    TOKEN_COUNTER,
    Changes,
    Event,
    LockRecord,
    Txn,
    Waiter,
    ancestors,
)
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores.base import Store, to_message
from bs_coordination.stores.txn_backend import (
    ABSENT,
    EVENT_COUNTER,
    WAITERS_KEY,
    Backend,
    Commit,
    Outcome,
    Restart,
    Stored,
    counter_key,
    decode,
    encode,
    key_names_key,
    patch,
    placeholder,
    records_key,
    under_key,
    unplace,
)

log = logging.getLogger(__name__)

#: Attempts of one batch before its operations fail as "store busy" ...
MAX_ATTEMPTS = 32
#: ... and at least for this long (seconds): on a loaded machine, with several replicas
#: contending for a few devices, 32 attempts can pass in a second without one going through.
BUSY_SECONDS = 5.0
#: Operations committed together at most.
MAX_BATCH = 64
#: Keys one commit checks at most, and keys it writes (with events and expiry index) at most,
#: unless one operation alone needs more (etcd refuses a transaction of more than 128
#: operations by default; a backend may pass its own limit).
MAX_OPS = 100
#: Cache entries before the cache is dropped (it is only a guess, never trusted).
CACHE_LIMIT = 50_000


# -- the view the lock table runs on -------------------------------------------------------

class _BatchView:
    """A ``TableView`` over the batch's writes, then the snapshot, then the cache. Notes the
    version of every key it answered from the backend's state (``read``)."""

    def __init__(self, engine: Engine, snapshot: dict[str, tuple[Any, Any]]) -> None:
        self.engine = engine
        self.snapshot = snapshot
        self.read: dict[str, tuple[Any, Any]] = {}  # key -> (version, value) as first read
        self.written: dict[str, Any] = {}  # key -> value written by an earlier operation
        self.fresh = True  # every key read came from ``snapshot``
        # Counters the backend assigns: the last placeholder handed out, per counter; events
        # numbered from 0 within the commit.
        self.counters: dict[str, int] = {}
        self.events = 0

    def value(self, key: str) -> Any:
        if key in self.written:
            return self.written[key]
        seen = self.read.get(key)
        if seen is None:
            seen = self.snapshot.get(key)
            if seen is None:
                self.fresh = False
                seen = self.engine.cache.get(key) or (ABSENT, decode(key, None))
            self.read[key] = seen
        return seen[1]

    def records_at(self, name: str) -> Iterable[LockRecord]:
        recs: dict[str, LockRecord] = self.value(records_key(name))
        return recs.values()

    def names_under(self, name: str) -> Iterable[str]:
        names: frozenset[str] = self.value(under_key(name))
        return names

    def names_of_key(self, key_hash: str) -> Iterable[str]:
        names: frozenset[str] = self.value(key_names_key(key_hash))
        return names

    def waiters(self) -> Iterable[Waiter]:
        waiters: dict[int, Waiter] = self.value(WAITERS_KEY)
        return waiters.values()

    def counter(self, name: str) -> int:
        if self.engine.assigns_counters:
            return self.counters.get(name, placeholder(name, 0))
        value: int = self.value(counter_key(name))
        return max(value, self.engine.floor.get(name, 0))

    # -- applying an operation's changes (as the memory store does) -------------------------
    def _set(self, key: str, value: Any) -> None:
        self.written[key] = value

    def apply(self, ch: Changes) -> list[tuple[int, Event]]:
        for (name, key_hash) in ch.deletes:
            recs = self.value(records_key(name))
            if key_hash not in recs:
                continue
            recs = {k: r for k, r in recs.items() if k != key_hash}
            self._set(records_key(name), recs)
            if not recs:
                for a in ancestors(name):
                    self._set(under_key(a), self.value(under_key(a)) - {name})
            self._set(key_names_key(key_hash), self.value(key_names_key(key_hash)) - {name})
        for (name, key_hash), rec in ch.puts.items():
            recs = dict(self.value(records_key(name)))
            if not recs:
                for a in ancestors(name):
                    self._set(under_key(a), self.value(under_key(a)) | {name})
            recs[key_hash] = rec
            self._set(records_key(name), recs)
            names = self.value(key_names_key(key_hash))
            if name not in names:
                self._set(key_names_key(key_hash), names | {name})
        if ch.waiters_put or ch.waiters_deleted:
            waiters = {t: w for t, w in self.value(WAITERS_KEY).items() if t not in ch.waiters_deleted}
            waiters.update(ch.waiters_put)
            self._set(WAITERS_KEY, waiters)
        if self.engine.assigns_counters:
            self.counters.update(ch.counters)
            numbered = [(self.events + i, e) for i, e in enumerate(ch.events)]
            self.events += len(ch.events)
            return numbered
        for name, value in ch.counters.items():
            self.value(counter_key(name))  # a counter written is checked too
            self._set(counter_key(name), value)
        if not ch.events:
            return []
        base = self.counter(EVENT_COUNTER)
        self._set(counter_key(EVENT_COUNTER), base + len(ch.events))
        return [(base + 1 + i, e) for i, e in enumerate(ch.events)]

    def commit(self, events: list[tuple[int, Event]], tags: list[Any], now: float) -> Commit:
        writes = {}
        expiry = []
        for key, value in self.written.items():
            writes[key] = encode(key, value)
            if key[0] == "r":
                before: dict[str, LockRecord] = self.read[key][1]
                for key_hash in before.keys() | value.keys():
                    old, new = before.get(key_hash), value.get(key_hash)
                    old_exp = None if old is None else old.due_at
                    new_exp = None if new is None else new.due_at
                    if old_exp != new_exp:
                        expiry.append((key[2:], key_hash, old_exp, new_exp))
        checks = {key: seen[0] for key, seen in self.read.items()}
        counters = {name: value - placeholder(name, 0) for name, value in self.counters.items()}
        return Commit(checks, writes, events, expiry, tags, now, counters)


# -- the engine ------------------------------------------------------------------------------

@dataclass
class _Op:
    fn: Callable[[Txn], Any]
    actor: str | None
    tag: Any
    future: asyncio.Future[tuple[Any, list[LockUpdateMessage]]]


@dataclass
class _Done:
    op: _Op
    result: Any
    error: BaseException | None
    numbered: list[tuple[int, Event]]


class Engine:
    """Runs lock-table operations on a ``Backend`` (see the module docstring).

    ``clock()``: the store's time; ``on_commit(messages)``: called after every commit that
    appended events (the store wakes its waiters, remembers tokens)."""

    def __init__(self, backend: Backend, clock: Callable[[], float],
                 on_commit: Callable[[list[LockUpdateMessage]], None] | None = None,
                 max_ops: int = MAX_OPS, assigns_counters: bool = False,
                 max_in_flight: int = 1) -> None:
        self.backend = backend
        self.max_ops = max_ops
        #: The backend assigns the fencing tokens and tickets (see ``Backend.filler``): the
        #: counters are then never read, checked or written as keys, so operations on unrelated
        #: devices never conflict, and events are numbered from 0 within each commit.
        self.assigns_counters = assigns_counters
        #: Commits this process may have in flight at once: one more batch starts at once while
        #: fewer are. More than one only pays with ``assigns_counters`` (else every two
        #: concurrent commits with a grant or an event conflict on the counters).
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.on_commit = on_commit
        #: logical key -> (version, parsed value): what this process last saw.
        self.cache: dict[str, tuple[Any, Any]] = {}
        #: counter -> a value it is never taken below.
        self.floor: dict[str, int] = {}
        self._queue: list[_Op] = []
        self._drainers: set[asyncio.Task[None]] = set()
        #: Commits sent and operations committed (for benchmarks and logs).
        self.commits = 0
        self.operations = 0

    async def run(self, fn: Callable[[Txn], Any], actor: str | None = None,
                  tag: Any = None) -> tuple[Any, list[LockUpdateMessage]]:
        """Run ``fn`` on the table; its result and the events it appended (with ids)."""
        future: asyncio.Future[tuple[Any, list[LockUpdateMessage]]] = (
            asyncio.get_running_loop().create_future())
        self._queue.append(_Op(fn, actor, tag, future))
        # A drainer that found the queue empty has returned (no await after that check), so
        # ``done()`` tells the live ones; the finished are dropped here.
        self._drainers = {d for d in self._drainers if not d.done()}
        if len(self._drainers) < self.max_in_flight:
            self._drainers.add(asyncio.ensure_future(self._drain()))
        return await future

    async def close(self) -> None:
        """Stop; operations still queued fail with ``StoreUnavailableError``."""
        drainers = list(self._drainers)
        for drainer in drainers:
            drainer.cancel()
        await asyncio.gather(*drainers, return_exceptions=True)
        self._fail(self._queue, StoreUnavailableError("lock store closed"))
        self._queue.clear()

    def forget(self) -> None:
        """Drop the cache (the stored table was replaced)."""
        self.cache.clear()

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            batch = [op for op in batch if not op.future.done()]  # cancelled callers
            try:
                rest = await self._commit(batch)
            except asyncio.CancelledError:
                self._fail(batch, StoreUnavailableError("lock store closed"))
                raise
            except Exception as exc:  # a bug: never leave a caller waiting
                log.exception("transaction engine failed")
                self._fail(batch, exc)
                continue
            self._queue[:0] = rest  # left out of a commit that would have been too large

    @staticmethod
    def _fail(ops: list[_Op], exc: BaseException) -> None:
        for op in ops:
            if not op.future.done():
                # each caller its own exception (a traceback is added where it is raised)
                op.future.set_exception(copy.copy(exc))

    def _too_large(self, view: _BatchView, events: int) -> bool:
        """Whether a commit of ``view`` could pass the backend's limits (``max_ops``): the
        checks, and the writes with the event log and the expiry index (two per record key)."""
        records = sum(1 for key in view.written if key[0] == "r")
        return (len(view.read) > self.max_ops
                or len(view.written) + events + 2 * records > self.max_ops)

    async def _commit(self, batch: list[_Op]) -> list[_Op]:
        """Run ``batch`` until one commit of it holds (or fail its operations with the
        backend's error); returns the operations left out, for the next commit."""
        state: list[list[_Op]] = [batch, []]
        try:
            return await self._attempts(state)
        except CoordinationError as exc:  # unavailable, busy, or refused by the backend
            self._fail(state[0], exc)
            return state[1]

    async def _attempts(self, state: list[list[_Op]]) -> list[_Op]:
        batch = state[0]
        snapshot: dict[str, tuple[Any, Any]] = {}
        attempts = 0
        loop = asyncio.get_running_loop()
        busy_at = loop.time() + BUSY_SECONDS
        while True:
            if attempts >= MAX_ATTEMPTS and loop.time() > busy_at:
                raise StoreUnavailableError(
                    f"lock store busy: no consistent update after {attempts} attempts in "
                    f"{BUSY_SECONDS:g} s")
            attempts += 1
            view = _BatchView(self, snapshot)
            now = self.clock()
            done: list[_Done] = []
            events: list[tuple[int, Event]] = []
            unsure = False
            for i, op in enumerate(batch):
                written_before = dict(view.written)
                txn = Txn(view, now, op.actor)
                error: BaseException | None = None
                result: Any = None
                numbered: list[tuple[int, Event]] = []
                try:
                    result = op.fn(txn)
                    numbered = view.apply(txn.changes())
                except CoordinationError as exc:
                    error = exc
                except Exception as exc:
                    if not view.fresh:  # maybe an artefact of a guessed view: read for real
                        unsure = True
                        break
                    error = exc
                if i and self._too_large(view, len(events) + len(numbered)):
                    view.written = written_before  # this one goes with the next commit
                    batch, state[1] = batch[:i], batch[i:] + state[1]
                    state[0] = batch
                    break
                done.append(_Done(op, result, error, numbered))
                events.extend(numbered)
            if unsure:
                snapshot = self._parse(await self.backend.read(list(view.read.keys() | snapshot.keys())))
                continue
            if not view.written and view.fresh:
                self._settle(done, {})  # decided on one snapshot taken during the requests
                return state[1]
            commit = view.commit(events, [d.op.tag for d in done], now)
            try:
                outcome = await self.backend.commit(commit)
            except Restart:
                self.forget()
                snapshot = {}
                continue
            self.commits += 1
            if not outcome.ok:
                snapshot = self._parse(outcome.snapshot)
                self.cache.update(snapshot)
                if attempts >= 3:
                    await asyncio.sleep(random.uniform(0, min(0.001 * 2 ** (attempts - 3), 0.05)))
                continue
            fill = outcome.fill
            for key, value in view.written.items():
                self._remember(key, outcome.versions.get(key, ABSENT),
                               value if fill is None else patch(value, fill))
            ids = dict(zip((n for n, _ in events), outcome.event_ids, strict=True))
            self.operations += len(done)
            if fill is not None:
                done = [_Done(d.op, patch(d.result, fill), d.error, patch(d.numbered, fill))
                        for d in done]
            messages = self._settle(done, ids)
            if messages and self.on_commit is not None:
                self.on_commit(messages)
            return state[1]

    @staticmethod
    def _settle(done: list[_Done], ids: dict[int, str]) -> list[LockUpdateMessage]:
        every: list[LockUpdateMessage] = []
        for d in done:
            if d.op.future.done():
                continue
            if d.error is not None:
                d.op.future.set_exception(d.error)
                continue
            messages = [to_message(e, ids[n]) for n, e in d.numbered]
            every.extend(messages)
            d.op.future.set_result((d.result, messages))
        return every

    def _parse(self, stored: dict[str, Stored]) -> dict[str, tuple[Any, Any]]:
        if not self.assigns_counters:
            return {key: (version, decode(key, text)) for key, (version, text) in stored.items()}
        filler = self.backend.filler  # a value stored by a commit still holds its placeholders
        return {key: (version, patch(decode(key, text), filler(version)) if key[0] in "rw"
                      else decode(key, text))
                for key, (version, text) in stored.items()}

    def _remember(self, key: str, version: Any, value: Any) -> None:
        if version == ABSENT or not value:
            self.cache.pop(key, None)
            return
        if len(self.cache) >= CACHE_LIMIT and key not in self.cache:
            self.cache.clear()
        self.cache[key] = (version, value)

    def saw_token(self, token: int) -> None:
        """A fencing token handed out (here or elsewhere): the counter stays above it."""
        if token > self.floor.get(TOKEN_COUNTER, 0):
            self.floor[TOKEN_COUNTER] = token


class EngineStore(Store):
    """A store whose table runs on an ``Engine`` (``self.engine``): the two ``Store``
    primitives every such store shares."""

    engine: Engine

    async def _transact(self, op: Callable[[Txn], Any], actor: str | None = None
                        ) -> tuple[Any, list[LockUpdateMessage]]:
        result, messages = await self.engine.run(op, actor)
        return result, messages

    async def _read(self, op: Callable[[Txn], Any]) -> Any:
        result, _ = await self.engine.run(op)
        return result


# The backend's side is re-exported: a store needs only this module.
__all__ = ["ABSENT", "EVENT_COUNTER", "Backend", "Commit", "Engine", "EngineStore", "Outcome", "Restart",
           "Stored", "decode", "encode", "patch", "placeholder", "unplace"]
