"""The Redis store: locks that survive restarts and are shared by several service replicas.

It runs the same ``locktable`` code as the memory store, on the optimistic transaction engine
every networked store shares (``stores/txn.py``: read with versions, run the rules, commit with
version checks, retry on conflict, group commit); this module is that engine's ``Backend`` for
Redis, so Redis only ever sees a compare-and-swap of the diff the lock table computed.
Everything goes through redis-py's public asyncio client (``redis.asyncio``); the URL forms it
accepts (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``) are in ``redis_url``.

**Keys** (``redis_keys``): logical key ``K`` is the string ``<prefix>:t:K`` holding
``"<version> <text>"``, so one ``MGET`` reads any set of keys with their versions at one
instant (``read``). A lock operation is **one round trip** in the common case: the engine runs
it on what this process last saw, then **one script call** (``redis_script.CAS``, registered
with redis-py's ``register_script``, which loads it again when a restarted or failed-over Redis
answers ``NOSCRIPT``) checks the table's epoch and every version read, and only then writes the
new texts under one new version, the set of names, the expiry index (sorted set) and the events
(``XADD`` to the stream ``redis_events`` reads), atomically. On a failed check it answers every
checked key as it is at that instant: the engine's snapshot, on which the operation runs again.
Versions are Redis time in microseconds (strictly increasing, and above every token this
process saw), so a key never has the same version twice with different content, even after
Redis restarted from an older state or was emptied.

**Counters** are not keys: the engine hands out placeholders (``Engine(assigns_counters=True)``)
and a commit at version ``V`` that handed out ``c`` values of a counter gets ``V .. V+c-1``
(``redis_json.filler``; the next version is above them). So fencing tokens rise in commit order,
service-wide, grants on unrelated devices never conflict on a counter, and a value stored with
its placeholder (and an event in the stream, with its field ``v``) is filled from its version.

**Time**: the operation needs "now" before the call, so the store keeps the offset between
``time.monotonic()`` and Redis ``TIME`` (every script reply carries ``TIME``; ``now()``, which
the sweeper calls, reads it too). An estimate taken from a reply is never ahead of Redis (the
reply left after ``TIME`` was read), so the highest of the last ``OFFSET_KEEP`` seconds is
kept. The script compares its own ``TIME`` with the ``now`` the operations used and refuses
(the store resynchronises and the engine runs them again) when it is more than ``MAX_AHEAD``
ahead or more than ``max_delay`` behind, so every replica decides expiry on Redis time within
those bounds. ``max_delay`` is below the reply timeout, so a call that reaches Redis only
after its caller gave up (a paused Redis) is refused, never applied.

**Data loss**: the meta hash's ``epoch`` names the table's generation; every commit (and every
sweep) checks it, so a Redis that was emptied or restarted without persistence is noticed,
reported once (``Store.data_lost``), and the new table starts its versions, hence its tokens,
above Redis time in microseconds and above every token this process saw. **An older layout**
(before this engine) found at attach is moved to this one (``redis_migrate``).

Durability across a failover (``redis_url``: ``wait_replicas``): the script call and a ``WAIT``
go in one pipeline (``WAIT`` counts the writes of its connection), and a change fewer replicas
confirmed in time is answered 503 (its outcome unknown to the caller, as for a lost reply).

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
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from bs_coordination.errors import StoreUnavailableError
from bs_coordination.locktable import LockRecord, RecordId
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores import redis_url
from bs_coordination.stores.base import new_lock_key
from bs_coordination.stores.redis_events import RedisEventLog
from bs_coordination.stores.redis_json import filler
from bs_coordination.stores.redis_migrate import migrate
from bs_coordination.stores.redis_script import ATTACH, CAS, cas_call
from bs_coordination.stores.txn import ABSENT, Commit, Engine, EngineStore, Outcome, Restart, Stored, decode, patch

log = logging.getLogger(__name__)


#: How far the ``now`` an operation used may be ahead of Redis ``TIME`` when its script runs.
MAX_AHEAD = 0.05
#: How far it may be behind at most (less when ``socket_timeout`` is short: see the docstring).
MAX_DELAY = 1.0
#: An offset estimate is replaced by a lower one only when it is older than this (seconds).
OFFSET_KEEP = 10.0
#: Keys one commit checks or writes at most, unless one operation alone needs more (a Redis
#: script has no such limit; this only bounds how large a group commit grows).
MAX_OPS = 2000


def _stored(value: str | None) -> Stored:
    """(version, text) of a ``<prefix>:t:`` key's value (``None``: absent)."""
    if value is None:
        return (ABSENT, None)
    version, _, text = value.partition(" ")
    return (int(version), text)


class RedisStore(EngineStore):
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
        self._cas = self._writes.register_script(CAS)
        self._attach_script = self._writes.register_script(ATTACH)
        self._max_delay = min(MAX_DELAY, socket_timeout / 2)
        # Redis time = time.monotonic() + offset (a lower bound; see the docstring).
        self._offset = time.time() - time.monotonic()
        self._offset_at = -OFFSET_KEEP
        self.engine = Engine(self, self._clock, on_commit=self._committed, max_ops=MAX_OPS,
                             assigns_counters=True)

        def tail_client() -> Any:
            return target.client(socket_timeout=None, retry=Retry(NoBackoff(), 0), **common)

        self.events = RedisEventLog(self._redis, self.keys.events, tail_client,
                                    redis_url.close, self.where, self._down)
        # The table's generation this store works on (``redis_script.ATTACH``): ``None`` until
        # attached. Every commit names it, so a Redis that lost its data is noticed.
        self._epoch: str | None = None
        self._attaching = asyncio.Lock()
        #: The highest fencing token this process has seen (granted here, or by another
        #: replica in the event log), and the highest version (and counter value) its commits
        #: were given: new versions, hence tokens, stay above both.
        self.token_floor = 0
        self._seen_version = 0

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
        await self.engine.close()
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
    def _clock(self) -> float:
        return time.monotonic() + self._offset

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

    # -- the engine's backend ----------------------------------------------------------
    async def read(self, keys: Collection[str]) -> dict[str, Stored]:
        """The engine's snapshot read: one ``MGET`` (one instant)."""
        keys = list(keys)
        with self._unavailable():
            values = await self._redis.mget([self.keys.table(k) for k in keys])
        return {k: _stored(v) for k, v in zip(keys, values, strict=True)}

    def filler(self, version: Any) -> Callable[[int], int]:
        return filler(int(version))

    async def commit(self, commit: Commit) -> Outcome:
        """One ``CAS`` call (see the module docstring)."""
        epoch = self._epoch
        if epoch is None:
            await self._attach(None)
            raise Restart  # run again on the attached table
        keys, args = cas_call(self.keys, commit, epoch, max(self.token_floor, self._seen_version),
                              (MAX_AHEAD, self._max_delay))
        reply = await self._call(keys, args)
        status = reply[0]
        self._observe_time(reply[1], reply[2], reset=status == "clock")
        if status == "clock":
            raise Restart  # ran at a wrong estimate of Redis time: run again on the new one
        if status == "lost":
            await self._attach(epoch)
            raise Restart
        if status == "stale":
            return Outcome(False, snapshot={k: _stored(v) for k, v in zip(commit.checks, reply[3], strict=True)})
        version = int(reply[3])
        self._seen_version = max(self._seen_version, version + max(commit.counters.values(), default=0))
        return Outcome(True, versions={k: ABSENT if text is None else version
                                       for k, text in commit.writes.items()},
                       event_ids=list(reply[4]), fill=filler(version))

    async def _call(self, keys: list[str], args: list[Any]) -> list[Any]:
        """Run the script (with ``WAIT`` when asked for). Raises ``StoreUnavailableError``
        when the outcome is unknown or the change was not confirmed by enough replicas."""
        try:
            if not self._wait_replicas:
                reply: list[Any] = await self._cas(keys=keys, args=args)
                return reply
            # ``self._cas(..., client=pipe)`` would have redis-py send ``SCRIPT EXISTS``
            # before every pipeline (one more round trip per commit): the script goes by its
            # SHA, and is loaded again only when Redis answers ``NOSCRIPT``.
            for _ in range(2):
                async with self._writes.pipeline(transaction=False) as pipe:
                    pipe.evalsha(self._cas.sha, len(keys), *keys, *args)
                    pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
                    reply, acked = await pipe.execute(raise_on_error=False)
                if not isinstance(reply, NoScriptError):
                    break
                await self._writes.script_load(CAS)  # a restarted or promoted Redis
            if isinstance(reply, Exception):
                raise reply
        except ResponseError as exc:
            # The script may have stopped part-way (what it wrote has a new version, so no
            # cached value is taken for it); start afresh anyway.
            self.engine.forget()
            await self._reconnect()
            raise self._down(exc) from None
        except (RedisError, OSError) as exc:
            await self._reconnect()
            raise self._down(exc) from None
        if reply[0] == "ok" and reply[3] != "0" and (
                isinstance(acked, Exception) or int(acked) < self._wait_replicas):
            await self._reconnect()
            raise StoreUnavailableError(
                f"lock store unavailable: Redis at {self.where}: the change was not "
                f"confirmed by {self._wait_replicas} replica(s) within "
                f"{self._wait_timeout_ms} ms (it may or may not have been kept)")
        return reply

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

    def _committed(self, messages: list[LockUpdateMessage]) -> None:
        for msg in messages:
            if msg.lock.token > self.token_floor:
                self.token_floor = msg.lock.token
        self.events.appended(messages)
        self.notify_changed()

    # -- the table's generation ------------------------------------------------------------
    async def _attach(self, stale: str | None) -> None:
        """Attach to the table's generation (``ATTACH``; moving an old layout first): on the
        first call, and after a call found that the generation ``stale`` it named is gone.
        Finding the data lost (an epoch this process knew replaced) is reported once
        (``Store.data_lost``); versions and tokens continue above every token handed out."""
        async with self._attaching:
            if self._epoch != stale:
                return  # another operation attached meanwhile
            k = self.keys
            floor = max(self.token_floor, self._seen_version)
            with self._unavailable():
                while True:
                    found, state = await self._attach_script(
                        keys=[k.meta, k.versions, k.names, k.old_waiters, *k.old_counters],
                        args=[new_lock_key(), floor, rk.MOVED])
                    if int(state) != 2:
                        break
                    await migrate(self._writes, k, new_lock_key(), floor)
            self._epoch = str(found)
            self.engine.forget()
            if stale is None:
                if int(state) == 1:
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
                found = await self._redis.hget(self.keys.meta, rk.EPOCH_FIELD)
            if found != epoch:
                await self._attach(epoch)
        return await super().sweep(limit)

    # -- Store primitives ------------------------------------------------------------------
    async def _all_records(self) -> list[LockRecord]:
        with self._unavailable():
            names = sorted(await self._redis.smembers(self.keys.names))
            values = await self._redis.mget([self.keys.table(f"r:{n}") for n in names]) if names else []
        out: list[LockRecord] = []
        for value in values:
            version, text = _stored(value)
            if text is not None:
                out += patch(list(decode("r:", text).values()), filler(version))
        return out

    async def _due(self, now: float, limit: int) -> list[RecordId]:
        with self._unavailable():
            members = await self._redis.zrangebyscore(self.keys.expiry, "-inf", now,
                                                      start=0, num=limit)
        return [rk.parse_expiry_member(m) for m in members]

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
