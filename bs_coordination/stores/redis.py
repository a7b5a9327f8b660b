"""The Redis store: locks that survive restarts and are shared by several service replicas.

It runs the same ``locktable`` code as the memory store: the rules stay in Python, the one
copy both stores run, so Redis only ever sees a compare-and-swap of the diff they computed.
Everything goes through redis-py's public asyncio client (``redis.asyncio``); the URL forms it
accepts (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``) are in ``redis_url``.
A lock operation is **one round trip** in the common case:

1. **Run on the cache.** The operation runs on a ``Txn`` over ``redis_txn.View``, answered from
   what this process last saw of each key (its version and content; a key never seen is
   guessed absent), noting every key it read and the version it read. "now" is Redis time,
   estimated locally (below).
2. **One script call.** ``redis_script.CAS`` (registered with redis-py's ``register_script``,
   which loads it again when a restarted or failed-over Redis answers ``NOSCRIPT``) checks that
   every key read still has that version (so the records on every name, the hierarchy's
   "under" sets, the key's set of names and the wait queue the lock table looked at are
   unchanged), then reserves the fencing-token/ticket values it used (``INCRBY``), writes the
   records, the index sets, the expiry sorted set and the waiters, appends the events
   (``XADD``) and gives every key it changed a new version, all atomically. A key the
   operation writes but did not read is checked too. Versions are Redis time in
   microseconds (strictly increasing), so a key never has the same version twice with
   different content, even after Redis restarted from an older state or was emptied.
3. **On a mismatch** nothing is written and the script returns the current content of the
   keys that changed, read at the same instant as the checks that passed: a snapshot of
   Redis. The operation runs again on it. A refusal (or a read such as ``device_status``)
   decided wholly on that snapshot is final without another call: the holder it names held
   the device at that instant, during the request. Anything else goes out again (bounded,
   with jitter from the third mismatch on).

Within one process, operations are ordered by arrival: one that reads a key an earlier one is
still writing waits for it and then runs on the cache that write updated, so a hot device sees
one writer of this process at a time rather than all of them going stale but one. Writes of
other replicas are met by the checks alone.

Counters are not compared: the lock table is given sentinel values and the script fills in
the values it reserved, so tokens are handed out in commit order (for any device a later grant
has a larger token) and grants on unrelated devices never conflict on the fencing counter.

Time: the operation needs "now" before the call, so the store keeps the offset between
``time.monotonic()`` and Redis ``TIME`` (every script reply carries ``TIME``; ``now()``, which
the sweeper calls, reads it too). An estimate taken from a reply is never ahead of Redis (the
reply left after ``TIME`` was read), so the highest of the last ``OFFSET_KEEP`` seconds is
kept. The script compares its own ``TIME`` with the ``now`` the operation used and refuses
(the store resynchronises and runs the operation again) when it is more than ``MAX_AHEAD``
ahead or more than ``max_delay`` behind, so every replica decides expiry on Redis time within
those bounds. ``max_delay`` is below the reply timeout, so a call that reaches Redis only
after its caller gave up (a paused Redis) is refused, never applied.

The script calls of concurrent operations go to Redis together, in one redis-py pipeline per
event-loop iteration (``redis_batch``). Durability across a failover (``redis_url``:
``wait_replicas``): the pipeline ends with a ``WAIT``, and a change fewer replicas confirmed
in time is answered 503 (its outcome unknown to the caller, as for a lost reply).

Failing closed: any connection error, timeout or Redis error becomes ``StoreUnavailableError``
("lock store unavailable: ...", HTTP 503, never the URL's password), and no grant is returned
unless the script's reply said it was written. The script calls go on a client of their own
that redis-py never retries (a retry after a lost reply could run a change twice); reads are
retried once. Every failed connection is replaced on the next call, so the store heals by
itself when Redis returns (or, with Sentinel, when a replica was promoted). The event log (a
Stream) is read by ``redis_events``, whose tail has a client of its own and does not parse the
events this process appended: it is handed them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError, ResponseError

from bs_coordination.errors import CoordinationError, StoreUnavailableError
from bs_coordination.locktable import TOKEN_COUNTER, Changes, LockRecord, RecordId, Txn
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores import redis_url
from bs_coordination.stores.base import Store, new_lock_key
from bs_coordination.stores.redis_batch import Batcher
from bs_coordination.stores.redis_events import RedisEventLog
from bs_coordination.stores.redis_json import parse_record
from bs_coordination.stores.redis_script import ATTACH, CAS
from bs_coordination.stores.redis_txn import Cache, Commit, Snapshot, View, Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Calls of one operation before giving up under contention.
MAX_ATTEMPTS = 64
#: ... and at least for this long: on a loaded machine, with several replicas contending for
#: a few devices, 64 attempts can pass in a second without one going through.
BUSY_SECONDS = 5.0
#: How far the ``now`` an operation used may be ahead of Redis ``TIME`` when its script runs.
MAX_AHEAD = 0.05
#: How far it may be behind at most (less when ``socket_timeout`` is short: see the docstring).
MAX_DELAY = 1.0
#: An offset estimate is replaced by a lower one only when it is older than this (seconds).
OFFSET_KEEP = 10.0


class RedisStore(Store):
    """The lock table in Redis. ``RedisStore("redis://host:6379/0")``; every URL form is in
    ``redis_url`` (TLS, a Unix socket, Sentinel, ``wait_replicas``)."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str = rk.DEFAULT_PREFIX,
                 socket_timeout: float = 2.0, connect_timeout: float = 1.0) -> None:
        super().__init__()
        self.keys = rk.KeySpace(prefix)
        target = redis_url.parse(url)
        # Only addresses ever appear in messages: the URL may carry a password.
        self.where = target.where
        self._password = target.password
        self._wait_replicas = target.wait_replicas
        self._wait_timeout_ms = target.wait_timeout_ms
        common: dict[str, Any] = dict(decode_responses=True, protocol=2,
                                      socket_connect_timeout=connect_timeout)
        # ``Any``: redis-py types every reply as ``bytes | str``; these clients decode.
        # Reads: one quick retry, so a request during an outage fails fast instead of after
        # redis-py 8's ten retries.
        self._redis: Any = target.client(
            socket_timeout=socket_timeout, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            **common)
        # Script calls: never retried by redis-py (see the module docstring).
        self._writes: Any = target.client(socket_timeout=socket_timeout,
                                          retry=Retry(NoBackoff(), 0), **common)
        self._batch = Batcher(self._writes, self._writes.register_script(CAS),
                              target.wait_replicas, target.wait_timeout_ms)
        self._attach_script = self._writes.register_script(ATTACH)
        self._max_delay = min(MAX_DELAY, socket_timeout / 2)
        self._cache = Cache()
        self._arrivals = itertools.count()
        # key -> the latest operation of this store that writes it, while it runs.
        self._writers: dict[str, Writer] = {}
        # Redis time = time.monotonic() + offset (a lower bound; see the docstring).
        self._offset = time.time() - time.monotonic()
        self._offset_at = -OFFSET_KEEP

        def tail_client() -> Any:
            return target.client(socket_timeout=None, retry=Retry(NoBackoff(), 0), **common)

        self.events = RedisEventLog(self._redis, self.keys.events, tail_client,
                                    redis_url.close, self.where, self._down)
        # The data generation this store works on (``redis_script.ATTACH``): ``None`` until
        # attached. Every call names it, so a Redis that lost its data is noticed.
        self._epoch: str | None = None
        self._attaching = asyncio.Lock()
        #: The highest fencing token this process has seen (granted here, or by another
        #: replica in the event log): the token counter never goes below it.
        self.token_floor = 0

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Check that Redis answers; an outage at start is logged, not fatal (the store
        answers 503 until Redis is reachable, then heals)."""
        try:
            await self.ping()
            await self._attach(None)
        except StoreUnavailableError as exc:
            log.warning("%s", exc.message)

    async def close(self) -> None:
        await self._batch.close()
        await redis_url.close(self._writes)
        await redis_url.close(self._redis)

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
        if self._password:
            text = text.replace(self._password, "***")
        return StoreUnavailableError(
            f"lock store unavailable: Redis at {self.where}: {type(exc).__name__}: {text}")

    # -- time --------------------------------------------------------------------------
    async def now(self) -> float:
        with self._unavailable():
            sec, usec = await self._redis.time()
        self._observe_time(sec, usec)
        return sec + usec / 1e6

    def _observe_time(self, sec: Any, usec: Any, *, reset: bool = False) -> None:
        """Redis said ``TIME`` = ``sec``, ``usec`` at some instant before now."""
        mono = time.monotonic()
        estimate = int(sec) + int(usec) / 1e6 - mono
        if reset or estimate > self._offset or mono - self._offset_at > OFFSET_KEEP:
            self._offset, self._offset_at = estimate, mono

    # -- primitives --------------------------------------------------------------------
    async def _read(self, op: Callable[[Txn], T]) -> T:
        result, _ = await self._transact(op, None)
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
        return [parse_record(v) for vals in rows for v in vals]

    async def _due(self, now: float, limit: int) -> list[RecordId]:
        with self._unavailable():
            members = await self._redis.zrangebyscore(self.keys.expiry, "-inf", now,
                                                      start=0, num=limit)
        return [rk.parse_expiry_member(m) for m in members]

    # -- transactions ------------------------------------------------------------------
    async def _transact(self, op: Callable[[Txn], T], actor: str | None = None
                        ) -> tuple[T, list[LockUpdateMessage]]:
        # Operations of this store are ordered by arrival: one waits for the earlier ones
        # still writing a key it reads, and is waited for by later ones reading a key it
        # writes (``_writers``), so a hot key sees one writer of this process at a time
        # instead of every one of them going stale but one. Only earlier ones are waited for,
        # so waits never form a cycle. Other replicas' writes are met by the checks alone.
        seq = next(self._arrivals)
        mine: Writer | None = None
        claimed: list[str] = []
        snapshot: Snapshot | None = None
        attempts = 0
        busy_until = time.monotonic() + BUSY_SECONDS
        try:
            while True:
                view = View(self.keys, self._cache, snapshot)
                now = time.monotonic() + self._offset
                txn = Txn(view, now, actor)
                error: Exception | None = None
                try:
                    result = op(txn)
                except CoordinationError as exc:
                    error = exc
                except Exception as exc:
                    if view.fresh:  # a real bug, not an artefact of a guessed view
                        raise
                    error = exc
                changes = txn.changes() if error is None else Changes()
                if view.fresh and changes.empty:
                    # Decided on one snapshot of Redis taken during this operation.
                    if error is not None:
                        raise error
                    return result, []
                epoch = self._epoch
                if epoch is None:
                    await self._attach(None)
                    continue
                commit = Commit(self.keys, view, changes, now, (MAX_AHEAD, self._max_delay),
                                epoch, self.token_floor)
                earlier = self._earlier_writers(seq, commit)
                if commit.finals:
                    if mine is None:
                        mine = Writer(seq)
                    for key in commit.finals:
                        held = self._writers.get(key)
                        if held is None or held.seq < seq:
                            self._writers[key] = mine
                            claimed.append(key)
                if earlier:
                    await asyncio.wait(earlier)
                    snapshot = None  # the cache now has what they wrote
                    continue
                if attempts >= MAX_ATTEMPTS and time.monotonic() > busy_until:
                    raise StoreUnavailableError(
                        f"lock store busy: no consistent update after {attempts} attempts "
                        f"in {BUSY_SECONDS:g} s")
                attempts += 1
                reply = await self._call(commit)
                status = reply[0]
                if status == "ok":
                    if error is not None:
                        raise error  # the reads it was decided on were confirmed
                    if changes.empty:
                        return result, []
                    bases = commit.bases
                    messages = commit.events(reply[5], bases)
                    self._saw_tokens(messages)
                    self.events.appended(messages)
                    self.notify_changed()
                    return commit.patch(result, bases), messages
                if status == "lost":
                    await self._attach(epoch)
                    snapshot = None
                    continue
                snapshot = commit.snapshot
                if status == "stale" and attempts >= 3:
                    await asyncio.sleep(random.uniform(0, min(0.001 * 2 ** (attempts - 3), 0.05)))
        finally:
            if mine is not None:
                mine.finish()
                for key in claimed:
                    if self._writers.get(key) is mine:
                        del self._writers[key]

    async def _call(self, commit: Commit) -> list[Any]:
        """Run ``commit``'s script call (``redis_batch``: with the calls made at the same time,
        and ``WAIT`` when asked for) and learn from the reply:
        the cache, the clock offset. Raises ``StoreUnavailableError`` when the outcome is
        unknown or the change was not confirmed by enough replicas."""
        try:
            reply, acked = await self._batch.call(commit.keys_arg, commit.args)
        except ResponseError as exc:
            # The script may have stopped part-way (keys it changed have new versions):
            # forget everything rather than trust what this process computed.
            self._cache.entries.clear()
            await self._reconnect()
            raise self._down(exc) from None
        except (RedisError, OSError) as exc:
            await self._reconnect()
            raise self._down(exc) from None
        status = reply[0]
        self._observe_time(reply[1], reply[2], reset=status == "clock")
        as_of = int(reply[1]) * 1_000_000 + int(reply[2])
        if status == "stale":
            commit.snapshot = commit.stale(self._cache, reply[3], as_of)
        elif status == "ok":
            if commit.ch.counters:
                commit.bases = [int(b) for b in reply[4]]
            if reply[3] != "0":
                commit.done(self._cache, reply[3], commit.bases)
                if acked is not None and acked < self._wait_replicas:
                    await self._reconnect()
                    raise StoreUnavailableError(
                        f"lock store unavailable: Redis at {self.where}: the change was not "
                        f"confirmed by {self._wait_replicas} replica(s) within "
                        f"{self._wait_timeout_ms} ms (it may or may not have been kept)")
        return list(reply)

    async def _reconnect(self) -> None:
        """After a failed or unconfirmed call: drop the idle connections of every client (the
        tail's at its next read), so the next calls connect again. With Sentinel that asks
        where the primary is now: a primary that lost its replicas (``NOREPLICAS``, ``WAIT``
        short) may have been replaced, and it answers no ``READONLY`` until it is demoted."""
        self.events.reconnects += 1
        for client in (self._writes, self._redis):
            try:
                await client.connection_pool.disconnect(inuse_connections=False)
            except (RedisError, OSError):  # closing a broken connection: nothing to keep
                pass

    # -- the data generation --------------------------------------------------------------
    async def _attach(self, stale: str | None) -> None:
        """Attach to the data's generation (``ATTACH``): on the first call, and after a call
        found that the generation ``stale`` it named is gone. Finding the data lost (an
        epoch this process knew replaced) is reported once (``Store.data_lost``); the fencing
        counter was raised above every token handed out before."""
        async with self._attaching:
            if self._epoch != stale:
                return  # another operation attached meanwhile
            with self._unavailable():
                found, created = await self._attach_script(
                    keys=[self.keys.versions, self.keys.counter(TOKEN_COUNTER)],
                    args=[new_lock_key(), self.token_floor])
            self._epoch = str(found)
            self._cache.entries.clear()
            if stale is None:
                if int(created):
                    log.info("Redis at %s holds no lock data yet: starting a new lock table "
                             "(fencing tokens continue above Redis time in microseconds)",
                             self.where)
                return
            self.data_lost(
                f"lock store lost its data: Redis at {self.where} no longer holds the lock "
                f"table this service was using (emptied, restarted without persistence, or "
                f"failed over to a replica without it); every lock and queued request it held "
                f"is gone, holders must lock again. Fencing tokens continue above every token "
                f"issued before (highest seen here: {self.token_floor}).")

    async def sweep(self, limit: int = 1000) -> int:
        """Expire leases that ran out; first check that Redis still holds this store's data,
        so a replica that makes no change notices a loss within a sweep interval too."""
        epoch = self._epoch
        if epoch is not None:
            with self._unavailable():
                found = await self._redis.hget(self.keys.versions, rk.EPOCH_FIELD)
            if found != epoch:
                await self._attach(epoch)
        return await super().sweep(limit)

    def _saw_tokens(self, messages: list[LockUpdateMessage]) -> None:
        for msg in messages:
            if msg.lock.token > self.token_floor:
                self.token_floor = msg.lock.token

    def _earlier_writers(self, seq: int, commit: Commit) -> list[asyncio.Future[None]]:
        """Unfinished earlier operations of this store that write a key ``commit`` reads."""
        out = []
        writers = self._writers
        for key in commit.view.read:
            held = writers.get(key)
            if held is not None and held.seq < seq and not held.finished:
                out.append(held.wait())
        return out

    # -- event log (redis_events) --------------------------------------------------------
    async def events_after(self, since: str | None, limit: int = 1000) -> list[LockUpdateMessage]:
        return await self.events.events_after(since, limit)

    async def last_event_id(self) -> str | None:
        return await self.events.last_event_id()

    async def tail(self, since: str | None) -> AsyncIterator[LockUpdateMessage]:
        # Tokens granted by other replicas raise this process's floor too.
        async for msg in self.events.tail(since):
            if msg.lock.token > self.token_floor:
                self.token_floor = msg.lock.token
            yield msg


__all__ = ["RedisStore"]
