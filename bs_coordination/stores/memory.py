"""The embedded store: one process, nothing to install, nothing kept across restarts.

Operations are atomic because the lock table is synchronous code run on the event loop
between two awaits. Records are indexed by name, by key and by expiry (a heap), so a lock
operation costs O(depth of the name + records touched), independent of how many locks exist.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

from bs_coordination import locktable
from bs_coordination.errors import InvalidRequestError
from bs_coordination.locktable import TOKEN_COUNTER, Changes, LockRecord, RecordId, Txn, Waiter
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores.base import Clock, EventGap, Store, SystemClock, to_message

T = TypeVar("T")

#: Events kept for ``/api/events`` and WebSocket resume.
DEFAULT_EVENT_LOG_SIZE = 10_000


class MemoryStore(Store):
    kind = "memory"

    def __init__(self, clock: Clock | None = None, event_log_size: int = DEFAULT_EVENT_LOG_SIZE) -> None:
        super().__init__()
        self.clock = clock or SystemClock()
        self._records: dict[str, dict[str, LockRecord]] = {}
        self._under: dict[str, set[str]] = {}
        self._key_names: dict[str, set[str]] = {}
        self._waiters: dict[int, Waiter] = {}
        # Fencing tokens start above the clock in microseconds: a service restarted on the
        # memory store (every lock lost) still hands out tokens larger than the last run's.
        self._counters: dict[str, int] = {TOKEN_COUNTER: int(self.clock.now() * 1_000_000)}
        self._expiry: list[tuple[float, str, str]] = []
        self._events: deque[LockUpdateMessage] = deque(maxlen=event_log_size)
        # Ids are "<start ms>-<n>" (the shape of a Redis Stream id): ids of an earlier run of
        # the service sort before this run's, so a client resuming across a restart is told to
        # resynchronise instead of silently missing this run's first events.
        self._epoch = int(time.time() * 1000)
        self._last_id = 0
        self._appended = asyncio.Event()

    # -- TableView ---------------------------------------------------------------------
    def records_at(self, name: str) -> Iterable[LockRecord]:
        return self._records.get(name, {}).values()

    def names_under(self, name: str) -> Iterable[str]:
        return self._under.get(name, ())

    def names_of_key(self, key_hash: str) -> Iterable[str]:
        return self._key_names.get(key_hash, ())

    def waiters(self) -> Iterable[Waiter]:
        return self._waiters.values()

    def counter(self, name: str) -> int:
        return self._counters.get(name, 0)

    # -- primitives --------------------------------------------------------------------
    async def now(self) -> float:
        return self.clock.now()

    async def _transact(self, op: Callable[[Txn], T], actor: str | None = None) -> tuple[T, list[LockUpdateMessage]]:
        txn = Txn(self, self.clock.now(), actor)
        result = op(txn)
        messages = self._apply(txn.changes())
        return result, messages

    async def _read(self, op: Callable[[Txn], T]) -> T:
        return op(Txn(self, self.clock.now()))

    async def _all_records(self) -> list[LockRecord]:
        return [r for recs in self._records.values() for r in recs.values()]

    async def _due(self, now: float, limit: int) -> list[RecordId]:
        due: list[RecordId] = []
        heap = self._expiry
        while heap and heap[0][0] <= now and len(due) < limit:
            due_at, name, key_hash = heapq.heappop(heap)
            rec = self._records.get(name, {}).get(key_hash)
            if rec is not None and rec.due_at == due_at:  # else a stale heap entry
                due.append((name, key_hash))
        return due

    async def events_after(self, since: str | None, limit: int = 1000) -> list[LockUpdateMessage]:
        if since is None:
            return list(self._events)[-limit:]
        after = self._seq(since)
        newer = self._last_id - after  # ids are consecutive: the newest ``newer`` entries
        if newer > len(self._events):
            raise EventGap(f"event {since} is older than the retained log")
        return self._newest(newer)[:limit]

    async def last_event_id(self) -> str | None:
        return self._id(self._last_id) if self._last_id else None

    async def tail(self, since: str | None) -> AsyncIterator[LockUpdateMessage]:
        last = self._seq(since) if since is not None else self._last_id
        while True:
            appended = self._appended
            newer = self._last_id - last
            if newer > len(self._events):
                raise EventGap(f"event {self._id(last)} is older than the retained log")
            if newer == 1:  # the usual case: one event since the last wake-up
                last += 1
                yield self._events[-1]
                continue
            if newer > 0:
                batch = self._newest(newer)
                last = self._last_id
                for m in batch:
                    yield m
                continue
            await appended.wait()

    def _newest(self, n: int) -> list[LockUpdateMessage]:
        """The newest ``n`` events, oldest first (ids are consecutive: no search)."""
        if n <= 0:
            return []
        newest = list(itertools.islice(reversed(self._events), n))
        newest.reverse()
        return newest

    def _id(self, seq: int) -> str:
        return f"{self._epoch}-{seq}"

    def _seq(self, event_id: str | None) -> int:
        """This run's sequence number of ``event_id``; ``EventGap`` for another run's id."""
        if not event_id or event_id == "0":
            return 0
        try:
            parts = [int(part) for part in event_id.split("-")]
        except ValueError:
            raise InvalidRequestError(
                f"since: {event_id[:40]!r} is not an event id of this service", field="since") from None
        if len(parts) != 2 or parts[0] != self._epoch:
            raise EventGap(f"event {event_id} belongs to an earlier run of the service")
        seq = parts[1]
        return seq

    # -- writing -----------------------------------------------------------------------
    def _apply(self, ch: Changes) -> list[LockUpdateMessage]:
        for (name, key_hash) in ch.deletes:
            recs = self._records.get(name)
            if recs is None or recs.pop(key_hash, None) is None:
                continue
            if not recs:
                del self._records[name]
                for a in locktable.ancestors(name):
                    under = self._under.get(a)
                    if under is not None:
                        under.discard(name)
                        if not under:
                            del self._under[a]
            names = self._key_names.get(key_hash)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._key_names[key_hash]
        for (name, key_hash), rec in ch.puts.items():
            recs = self._records.setdefault(name, {})
            if not recs:
                for a in locktable.ancestors(name):
                    self._under.setdefault(a, set()).add(name)
            old = recs.get(key_hash)
            recs[key_hash] = rec
            self._key_names.setdefault(key_hash, set()).add(name)
            due_at = rec.due_at
            if due_at is not None and (old is None or old.due_at != due_at):
                heapq.heappush(self._expiry, (due_at, name, key_hash))
        self._counters.update(ch.counters)
        for ticket in ch.waiters_deleted:
            self._waiters.pop(ticket, None)
        self._waiters.update(ch.waiters_put)
        messages = []
        for event in ch.events:
            self._last_id += 1
            msg = to_message(event, self._id(self._last_id))
            self._events.append(msg)
            messages.append(msg)
        if messages:
            self._appended.set()
            self._appended = asyncio.Event()
        if not ch.empty:
            self.notify_changed()
        return messages

