"""The Redis store: locks that survive restarts and are shared by several service replicas.

It runs the same ``locktable`` code as the memory store. How an operation becomes one atomic
read-modify-write: optimistic ``WATCH``/``MULTI``, not a compare-and-swap script holding the
rules, because the rules live in Python and must stay the one copy both stores run.

1. **Speculate.** The operation runs on a ``Txn`` over a view answered from a local cache of
   what this process last saw (never trusted, only a guess). Every key the view is asked for
   and has not read in this attempt is noted as *missing* (``redis_txn.View``). The lock
   table is pure, so running it on a guess has no effect; its result is thrown away.
2. **Fetch.** One round trip on a dedicated connection: ``WATCH`` the missing keys, then one
   call of the ``APPLY`` script (``redis_script``: it runs a list of plain commands) doing
   ``TIME`` (the clock every replica shares), the reads, and ``INCRBY`` reservations of
   fencing-token/ticket values. They come after the ``WATCH``, so for any device the token
   order is the commit order (see ``Snapshot.counters_to_reserve``).
3. **Run again** on what was read. If it asks for something not yet read (e.g. the records
   on names found in an "under" set), fetch that too (more keys are watched) and run again.
4. **Commit** ``txn.changes()`` in one ``MULTI``/``APPLY``/``EXEC``: record hashes, the
   "under", key and name sets, the expiry sorted set, waiters, and one ``XADD`` per event.
   ``EXEC`` fails when any watched key changed; then the attempt starts over (bounded, with
   jitter). Event ids are the stream ids ``EXEC`` returns, so messages are built after it.

With a warm cache an operation is two round trips (fetch, commit; an operation that changes
nothing still sends an empty ``EXEC`` to confirm its reads). A refusal is one round trip: it
writes nothing, and the holder it names held the device at the instant it was read, during the
request. Read-only operations (``device_status``) need no ``WATCH``: one ``APPLY`` call is
atomic, so each round trip reads one consistent snapshot. ``APPLY`` is loaded once per Redis
process (``EVALSHA``; after a restart ``NOSCRIPT`` makes the attempt load it and start over).

Fencing tokens come from one counter that only increases. Values are reserved before the
commit, so two grants on *unrelated* devices may commit in the opposite order of their tokens;
for one device (and every name overlapping it) a later grant always has a larger token.

Failing closed: any connection error, timeout or Redis error becomes ``StoreUnavailableError``
("lock store unavailable: ...", HTTP 503, never the URL's password), and no grant is returned
unless ``EXEC`` succeeded. Connections come from a pool that reconnects on the next use, so
the store heals by itself when Redis returns; one round trip is bounded by ``socket_timeout``
(2 s) and a refused connection fails at once. The event log (a Stream) is read by
``redis_events``, whose tail uses a client of its own without a read timeout (redis-py 8's
5 s default plus retries breaks ``XREAD BLOCK``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as redis_async
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from bs_coordination import locktable
from bs_coordination.errors import CoordinationError, StoreUnavailableError
from bs_coordination.locktable import Changes, LockRecord, RecordId, Txn
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.base import Store, to_message
from bs_coordination.stores.redis_events import RedisEventLog
from bs_coordination.stores.redis_script import APPLY, ScriptCall, is_noscript, pack
from bs_coordination.stores.redis_txn import Needs, Snapshot, View, WatchCache

if sys.version_info >= (3, 11):
    from asyncio import timeout as async_timeout
else:  # redis-py depends on it there
    from async_timeout import timeout as async_timeout

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts of one operation before giving up under contention.
MAX_ATTEMPTS = 64


class _ScriptMissing(Exception):
    """Redis does not have ``APPLY`` (restarted): load it and start the attempt over."""


class _Unknown(Exception):
    """``EXEC`` was sent but its answer was lost: the outcome is unknown."""


class RedisStore(Store):
    """The lock table in Redis. ``RedisStore("redis://host:6379/0")``."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str = rk.DEFAULT_PREFIX,
                 socket_timeout: float = 2.0, connect_timeout: float = 1.0) -> None:
        super().__init__()
        self.keys = rk.KeySpace(prefix)
        parts = urlsplit(url)
        # Only host and port ever appear in messages: the URL may carry a password.
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        common: dict[str, Any] = dict(decode_responses=True, protocol=2,
                                      socket_connect_timeout=connect_timeout)
        # One quick retry, so a request during an outage fails fast instead of after
        # redis-py 8's ten retries.
        # ``Any``: redis-py types every reply as ``bytes | str``; this client decodes.
        self._redis: Any = redis_async.Redis.from_url(
            url, socket_timeout=socket_timeout, **common,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1))
        # Transactions hold a connection across round trips and may leave a WATCH behind
        # (a refusal writes nothing); their own pool keeps that away from plain commands.
        # ``_batch`` bounds a whole round trip itself (redis-py would start a task per send).
        self._txn_pool = redis_async.ConnectionPool.from_url(url, socket_timeout=None, **common)
        self._url = url
        self._socket_timeout = socket_timeout
        self._cache = WatchCache()
        self.events = RedisEventLog(self._redis, self.keys.events, url, common, self.where,
                                    self._down)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Check that Redis answers; an outage at start is logged, not fatal (the store
        answers 503 until Redis is reachable, then heals)."""
        try:
            await self.ping()
        except StoreUnavailableError as exc:
            log.warning("%s", exc.message)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._txn_pool.disconnect()

    async def ping(self) -> None:
        with self._unavailable():
            await self._redis.ping()

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None

    def _down(self, exc: BaseException) -> StoreUnavailableError:
        text = str(exc)
        password = urlsplit(self._url).password
        if password:
            text = text.replace(password, "***")
        return StoreUnavailableError(
            f"lock store unavailable: Redis at {self.where}: {type(exc).__name__}: {text}")

    # -- primitives --------------------------------------------------------------------
    async def now(self) -> float:
        with self._unavailable():
            sec, usec = await self._redis.time()
        return sec + usec / 1e6

    async def _transact(self, op: Callable[[Txn], T], actor: str | None = None
                        ) -> tuple[T, list[LockUpdateMessage]]:
        return await self._run(op, actor, write=True)

    async def _read(self, op: Callable[[Txn], T]) -> T:
        result, _ = await self._run(op, None, write=False)
        return result

    async def _all_records(self) -> list[LockRecord]:
        with self._unavailable():
            names = sorted(await self._redis.smembers(self.keys.names))
            if not names:
                return []
            async with self._redis.pipeline(transaction=True) as pipe:
                for n in names:
                    pipe.hvals(self.keys.records(n))
                rows = await pipe.execute()
        return [LockRecord.from_dict(json.loads(v)) for vals in rows for v in vals]

    async def _due(self, now: float, limit: int) -> list[RecordId]:
        with self._unavailable():
            members = await self._redis.zrangebyscore(self.keys.expiry, "-inf", now,
                                                      start=0, num=limit)
        return [rk.parse_expiry_member(m) for m in members]

    # -- transactions ------------------------------------------------------------------
    async def _run(self, op: Callable[[Txn], T], actor: str | None, *, write: bool
                   ) -> tuple[T, list[LockUpdateMessage]]:
        conn = None
        clean = False  # the connection holds no unread reply and may go back to the pool
        try:
            snap = Snapshot()
            for attempt in range(MAX_ATTEMPTS):
                view = View(snap, self._cache)
                txn = Txn(view, snap.now if snap.now is not None else time.time(), actor)
                error: Exception | None = None
                try:
                    result = op(txn)
                except CoordinationError as exc:
                    error = exc
                except Exception as exc:
                    if not view.needs:  # a real bug, not an artefact of a guessed view
                        raise
                    error = exc
                changes = txn.changes() if error is None else None
                if changes is not None:
                    view.check_counters(changes)
                if view.needs:
                    if conn is None:
                        conn = await self._txn_pool.get_connection()
                    clean = False
                    try:
                        await self._fetch(conn, snap, view.needs, write)
                    except _ScriptMissing:
                        snap = await self._load_script(conn)
                    clean = True
                    continue
                if error is not None:
                    raise error
                assert changes is not None
                if not write or conn is None:
                    return result, []
                # Also with no changes: an empty EXEC confirms the reads were one state.
                clean = False
                try:
                    messages = await self._commit(conn, snap, changes)
                except _ScriptMissing:
                    snap = await self._load_script(conn)
                    clean = True
                    continue
                clean = True
                if messages is not None:
                    if not changes.empty:
                        self.notify_changed()
                    return result, messages
                # A watched key changed: start over on fresh reads.
                snap = Snapshot()
                await asyncio.sleep(random.uniform(0, min(0.001 * 2 ** attempt, 0.05)))
            raise StoreUnavailableError(
                f"lock store busy: no consistent update after {MAX_ATTEMPTS} attempts")
        except _Unknown as exc:
            raise self._down(exc.__cause__ or exc) from None
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise self._down(exc) from None
        finally:
            if conn is not None:
                if not clean:
                    # Drops unread replies and any WATCH; the pool reconnects on next use.
                    await conn.disconnect()
                await self._txn_pool.release(conn)

    async def _batch(self, conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and read every reply (errors as values), within one
        ``socket_timeout`` for the whole batch."""
        replies: list[Any] = []
        async with async_timeout(self._socket_timeout):
            await conn.send_packed_command(pack(commands), check_health=False)
            for _ in commands:
                try:
                    replies.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:
                    replies.append(exc)
        return replies

    async def _load_script(self, conn: Any) -> Snapshot:
        """Register ``APPLY`` (Redis restarted and forgot it); the attempt starts over."""
        [sha] = await self._batch(conn, [("SCRIPT", "LOAD", APPLY)])
        if isinstance(sha, Exception):
            raise sha
        return Snapshot()

    async def _fetch(self, conn: Any, snap: Snapshot, needs: Needs, write: bool) -> None:
        """One round trip: read what the last run was missing (under ``WATCH`` when writing,
        else everything read so far again, as one snapshot)."""
        k = self.keys
        if not write:
            needs = snap.read.union(needs)
        call = ScriptCall()
        sinks: list[Callable[[Any], None]] = [snap.set_time]
        call.add("TIME")
        for n in needs.records:
            call.add("HVALS", k.records(n))
            sinks.append(partial(snap.set_records, n))
        for n in needs.under:
            call.add("SMEMBERS", k.under(n))
            sinks.append(partial(snap.set_under, n))
        for h in needs.key_names:
            call.add("SMEMBERS", k.key_names(h))
            sinks.append(partial(snap.set_key_names, h))
        if needs.waiters:
            call.add("HVALS", k.waiters)
            sinks.append(snap.set_waiters)
        for name, count in snap.counters_to_reserve(needs).items():
            if write:
                call.add("INCRBY", k.counter(name), count)
                sinks.append(partial(snap.set_counter, name, count))
            else:
                call.add("GET", k.counter(name))
                sinks.append(partial(snap.set_counter, name, 0))

        head: list[tuple[Any, ...]] = []
        if write:
            # The reads (and the reservations after them) come after the WATCH.
            head = [] if snap.rounds else [("UNWATCH",)]
            watched = [key for key in call.keys if not key.startswith(k.counter(""))]
            if watched:
                head.append(("WATCH", *watched))
        else:
            snap.reset()
        replies = await self._batch(conn, [*head, call.command()])
        for value in replies[:-1]:
            if isinstance(value, Exception):
                raise value
        values = replies[-1]
        if is_noscript(values):
            raise _ScriptMissing
        if isinstance(values, Exception):
            raise values
        for sink, value in zip(sinks, values, strict=True):
            sink(value)
        snap.rounds += 1
        snap.read = snap.read.union(needs)
        self._cache.learn(snap)

    async def _commit(self, conn: Any, snap: Snapshot, ch: Changes
                      ) -> list[LockUpdateMessage] | None:
        """Write ``ch`` in one ``MULTI``/``EXEC``; ``None`` if a watched key changed."""
        k = self.keys
        call = ScriptCall()
        final = snap.apply(ch)
        for name, (before, after) in final.items():
            if before and not after:
                for a in locktable.ancestors(name):
                    call.add("SREM", k.under(a), name)
                call.add("SREM", k.names, name)
            elif after and not before:
                for a in locktable.ancestors(name):
                    call.add("SADD", k.under(a), name)
                call.add("SADD", k.names, name)
        for rid, rec in ch.deletes.items():
            call.add("HDEL", k.records(rid[0]), rid[1])
            call.add("SREM", k.key_names(rid[1]), rid[0])
            if rec.expires_at is not None:
                call.add("ZREM", k.expiry, rk.expiry_member(rid))
        for rid, rec in ch.puts.items():
            call.add("HSET", k.records(rid[0]), rid[1], _dump(rec.to_dict()))
            call.add("SADD", k.key_names(rid[1]), rid[0])
            if rec.expires_at is not None:
                call.add("ZADD", k.expiry, repr(rec.expires_at), rk.expiry_member(rid))
            else:
                call.add("ZREM", k.expiry, rk.expiry_member(rid))
        for ticket in ch.waiters_deleted:
            call.add("HDEL", k.waiters, ticket)
        for ticket, w in ch.waiters_put.items():
            call.add("HSET", k.waiters, ticket, _dump(w.to_dict()))
        messages = [to_message(e, "") for e in ch.events]
        xadds = [call.add("XADD", k.events, "MAXLEN", "~", rk.EVENTS_MAXLEN, "*",
                          rk.EVENT_FIELD, m.model_dump_json(exclude={"event_id"}))
                 for m in messages]
        body = [call.command()] if call.count else []
        try:
            replies = await self._batch(conn, [("MULTI",), *body, ("EXEC",)])
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise _Unknown("the commit's outcome is unknown") from exc
        result = replies[-1]
        if result is None:
            return None
        if isinstance(result, Exception):
            raise result
        if not body:
            return []
        [values] = result
        if is_noscript(values):
            raise _ScriptMissing
        if isinstance(values, Exception):
            # A script stopped by an error keeps what it wrote before it (never expected).
            log.error("lock store write failed inside a transaction: %s", values)
            raise values
        self._cache.commit(final, ch)
        out = [m.model_copy(update={"event_id": values[i]})
               for m, i in zip(messages, xadds, strict=True)]
        self.events.appended(out)
        return out

    # -- event log (redis_events) --------------------------------------------------------
    async def events_after(self, since: str | None, limit: int = 1000) -> list[LockUpdateMessage]:
        return await self.events.events_after(since, limit)

    async def last_event_id(self) -> str | None:
        return await self.events.last_event_id()

    def tail(self, since: str | None) -> AsyncIterator[LockUpdateMessage]:
        return self.events.tail(since)


def _dump(d: dict[str, Any]) -> str:
    return json.dumps(d, separators=(",", ":"))


__all__ = ["RedisStore"]
