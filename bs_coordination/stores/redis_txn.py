"""The Redis store's optimistic transaction: what an operation read, at which version, and the
one compare-and-swap call (``redis_script.CAS``) that commits it. ``redis`` explains the design.

``View`` is the ``TableView`` the lock table runs on. It answers from a ``Snapshot`` (a view of
Redis at one instant, from the reply of the previous attempt) or else from ``Cache`` (what this
process saw last, a key never seen guessed absent), and notes every key it answered with the
version it answered from. ``Commit`` turns that read set and ``txn.changes()`` into the
script's KEYS and ARGV (plain strings: redis-py encodes them): the checks, the counters to
reserve, the write commands, the events; and applies the reply.

Counters are never read. ``View.counter`` answers a *sentinel* base far above any real value,
so the values an operation hands out are recognisable; where one is written (a record's
``token``, a waiter's ``ticket``) the text carries a hole that the script fills from the value
it reserved with ``INCRBY`` in the same call. Tokens are therefore handed out in commit order,
and contention on the one fencing counter never makes an operation start over.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from bs_coordination.locktable import (
    TICKET_COUNTER,
    TOKEN_COUNTER,
    Changes,
    LockRecord,
    Waiter,
    ancestors,
)
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.base import to_message
from bs_coordination.stores.redis_json import (
    event_json,
    parse_record,
    parse_waiter,
    record_json,
    waiter_json,
)
from bs_coordination.stores.redis_script import FIXED_KEYS

#: Entries in the cache before it is dropped (it is only a guess, never trusted).
CACHE_LIMIT = 50_000

#: Base of the values ``View.counter`` answers: counter ``c`` (0-based, in ``COUNTERS``) answers
#: ``SENTINEL + c * SPAN``, so its n-th value this operation is ``SENTINEL + c * SPAN + n``.
SENTINEL = 1 << 60
SPAN = 1 << 32
#: The counters, in the order of their keys in every call (``KeySpace.fixed``).
COUNTERS = (TOKEN_COUNTER, TICKET_COUNTER)

#: Shapes of what a key holds; the first letter is the script's kind (hash or set).
RECORDS = "h:records"
WAITERS = "h:waiters"
NAMES = "s:names"

#: Indexes (1-based, as text) of the fixed keys the commands write (``KeySpace.fixed``).
_NAMES_KEY, _EXPIRY_KEY, _EVENTS_KEY = "2", "3", "4"

#: (version, parsed content); version "" means the key is absent (content empty).
Entry = tuple[str, Any]
_EMPTY: dict[str, Any] = {RECORDS: {}, WAITERS: {}, NAMES: frozenset()}
_ABSENT: dict[str, Entry] = {shape: ("", empty) for shape, empty in _EMPTY.items()}


def parse(shape: str, values: Iterable[str]) -> Any:
    """Content of a key as the script returns it (``HVALS`` / ``SMEMBERS``)."""
    if shape == NAMES:
        return frozenset(values)
    if shape == WAITERS:
        waiters = (parse_waiter(v) for v in values)
        return {w.ticket: w for w in sorted(waiters, key=lambda w: w.ticket)}
    # Oldest first, as the memory store keeps them (a Redis hash has no useful order), so
    # both stores name the same holder first in a refusal.
    recs = sorted((parse_record(v) for v in values),
                  key=lambda r: (r.acquired_at, r.token))
    return {r.key_hash: r for r in recs}


def _version(text: str) -> int:
    return int(text) if text else 0


class Writer:
    """An operation of a store that writes keys, while it runs: the store orders its operations
    by arrival with these (``RedisStore._transact``)."""

    __slots__ = ("_waiting", "finished", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq  # its arrival
        self.finished = False
        self._waiting: list[asyncio.Future[None]] = []

    def wait(self) -> asyncio.Future[None]:
        """Done when this operation has finished."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        return fut

    def finish(self) -> None:
        self.finished = True
        for fut in self._waiting:
            if not fut.done():
                fut.set_result(None)


class Cache:
    """What this process last saw in Redis, per key: its version and parsed content. Only
    non-empty keys are kept (a key not here is guessed absent). Replies may arrive in any
    order (several connections), so an entry is replaced only by what Redis held at a later
    instant (``as_of``, in the versions' unit: Redis time in microseconds)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def put(self, key: str, version: str, content: Any, as_of: int) -> None:
        old = self.entries.get(key)
        if old is not None and _version(old[0]) > as_of:
            return  # this process already saw a later state of the key
        if not version or not content:
            self.entries.pop(key, None)
            return
        if len(self.entries) >= CACHE_LIMIT and key not in self.entries:
            self.entries.clear()
        self.entries[key] = (version, content)


Snapshot = dict[str, Entry]


class View:
    """A ``TableView`` over a snapshot and the cache that notes what it answered."""

    def __init__(self, keys: rk.KeySpace, cache: Cache, snapshot: Snapshot | None) -> None:
        self.keys = keys
        self.cache = cache
        self.snapshot = snapshot
        # key -> (its index in the call's KEYS, shape, entry answered), in the order read.
        self.read: dict[str, tuple[int, str, Entry]] = {}
        self.fresh = snapshot is not None  # every answer came from the snapshot

    def entry(self, key: str, shape: str) -> Entry:
        read = self.read
        seen = read.get(key)
        if seen is not None:
            return seen[2]
        entry = self.snapshot.get(key) if self.snapshot is not None else None
        if entry is None:
            self.fresh = False
            entry = self.cache.entries.get(key) or _ABSENT[shape]
        read[key] = (FIXED_KEYS + 1 + len(read), shape, entry)
        return entry

    def records_at(self, name: str) -> Iterable[LockRecord]:
        recs: dict[str, LockRecord] = self.entry(self.keys.records(name), RECORDS)[1]
        return recs.values()

    def names_under(self, name: str) -> Iterable[str]:
        names: frozenset[str] = self.entry(self.keys.under(name), NAMES)[1]
        return names

    def names_of_key(self, key_hash: str) -> Iterable[str]:
        names: frozenset[str] = self.entry(self.keys.key_names(key_hash), NAMES)[1]
        return names

    def waiters(self) -> Iterable[Waiter]:
        waiters: dict[int, Waiter] = self.entry(self.keys.waiters, WAITERS)[1]
        return waiters.values()

    def counter(self, name: str) -> int:
        """A sentinel base (see the module docstring); the script reserves the real values."""
        return SENTINEL + COUNTERS.index(name) * SPAN


#: A JSON array of strings, as the script decodes it (``cjson``; UTF-8 as is).
_array = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _hole(value: int) -> str:
    number, offset = divmod(value - SENTINEL, SPAN)
    return f"\1{number + 1}:{offset}\1"


def _text(value: int) -> str:
    """A counter value as written: the number, or the hole the script fills."""
    return str(value) if value < SENTINEL else _hole(value)


def _real(value: int, bases: list[int]) -> int:
    if value < SENTINEL:
        return value
    number, offset = divmod(value - SENTINEL, SPAN)
    return bases[number] + offset


class Commit:
    """The one ``CAS`` call of an attempt, built from what the view read and the changes:
    ``keys`` and ``args`` as the script takes them (``redis_script``)."""

    #: After a "stale" reply: Redis at the instant the script ran (``stale``).
    snapshot: Snapshot | None = None
    #: After an "ok" reply: each counter's reserved base (none if no counter was used).
    bases: list[int] = []

    def __init__(self, keys: rk.KeySpace, view: View, ch: Changes, now: float,
                 limits: tuple[float, float], epoch: str, token_floor: int) -> None:
        """``limits``: how far ``now`` may be ahead of and behind Redis ``TIME`` (ARGV 2 and
        3); ``epoch`` and ``token_floor``: the generation the store attached to and the
        highest token it saw (ARGV 6 and 7)."""
        self.keys = keys
        self.view = view
        self.ch = ch
        # Versioned keys written: key -> (shape, content after the write, sentinels unfilled).
        self.finals: dict[str, tuple[str, Any]] = {}
        self._commands: list[str] = []  # name, n, key index, n arguments; for each command
        self._patched: dict[int, LockRecord] = {}  # id(record with a sentinel) -> real
        self._build_writes()
        self.keys_arg, self.args = self._encode(now, limits, epoch, token_floor)

    # -- building ------------------------------------------------------------------------
    def _add(self, name: str, key: str, *args: str) -> None:
        """Append a command (``key``: the index of its key in KEYS, as text)."""
        self._commands += (name, str(len(args)), key, *args)

    def _key(self, key: str) -> str:
        """The index of ``key`` (a key this operation read) in KEYS."""
        return str(self.view.read[key][0])

    def _before(self, key: str, shape: str) -> Any:
        """Content of ``key`` as this operation read it (read now, and so checked, if the lock
        table did not: every key written is checked)."""
        if key in self.finals:
            return self.finals[key][1]
        return self.view.entry(key, shape)[1]

    def _build_writes(self) -> None:
        k, ch = self.keys, self.ch
        # name -> (its records key, whether it had records, its records after the changes)
        touched: dict[str, tuple[str, bool, dict[str, LockRecord]]] = {}
        for (name, key_hash) in ch.deletes:
            self._records(touched, name).pop(key_hash, None)
        for (name, key_hash), rec in ch.puts.items():
            self._records(touched, name)[key_hash] = rec
        for name, (key, had, after) in touched.items():
            self.finals[key] = (RECORDS, after)
            if had == bool(after):
                continue
            command = "SADD" if after else "SREM"
            for a in ancestors(name):
                under = k.under(a)
                names = self._before(under, NAMES)  # a frozenset
                self.finals[under] = (NAMES, names | {name} if after else names - {name})
                self._add(command, self._key(under), name)
            self._add(command, _NAMES_KEY, name)
        for rid, rec in ch.deletes.items():
            name, key_hash = rid
            self._add("HDEL", self._key(touched[name][0]), key_hash)
            self._key_set(k.key_names(key_hash), name, add=False)
            if rec.expires_at is not None:
                self._add("ZREM", _EXPIRY_KEY, rk.expiry_member(rid))
        for rid, rec in ch.puts.items():
            name, key_hash = rid
            self._add("HSET", self._key(touched[name][0]), key_hash,
                      record_json(rec, _text(rec.token)))
            self._key_set(k.key_names(key_hash), name, add=True)
            if rec.expires_at is not None:
                self._add("ZADD", _EXPIRY_KEY, repr(rec.expires_at), rk.expiry_member(rid))
            else:
                old = self.view.entry(touched[name][0], RECORDS)[1].get(key_hash)
                if old is not None and old.expires_at is not None:
                    self._add("ZREM", _EXPIRY_KEY, rk.expiry_member(rid))
        if ch.waiters_put or ch.waiters_deleted:
            waiters = dict(self._before(k.waiters, WAITERS))
            for ticket in ch.waiters_deleted:
                waiters.pop(ticket, None)
                if ticket < SENTINEL:  # else queued and dropped within this operation
                    self._add("HDEL", self._key(k.waiters), str(ticket))
            for ticket, w in ch.waiters_put.items():
                waiters[ticket] = w
                self._add("HSET", self._key(k.waiters), _text(ticket),
                          waiter_json(w, _text(ticket)))
            self.finals[k.waiters] = (WAITERS, waiters)
        for event in ch.events:
            self._add("XADD", _EVENTS_KEY, "MAXLEN", "~", str(rk.EVENTS_MAXLEN), "*",
                      rk.EVENT_FIELD, event_json(event, _text(event.record.token)))

    def _records(self, touched: dict[str, tuple[str, bool, dict[str, LockRecord]]],
                 name: str) -> dict[str, LockRecord]:
        slot = touched.get(name)
        if slot is None:
            key = self.keys.records(name)
            before = self._before(key, RECORDS)
            slot = touched[name] = (key, bool(before), dict(before))
        return slot[2]

    def _key_set(self, key: str, name: str, *, add: bool) -> None:
        before = self._before(key, NAMES)  # a frozenset
        if (name in before) == add:
            return  # unchanged: no write, no new version
        self.finals[key] = (NAMES, before | {name} if add else before - {name})
        self._add("SADD" if add else "SREM", self._key(key), name)

    def _encode(self, now: float, limits: tuple[float, float], epoch: str,
                token_floor: int) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of the ``CAS`` call (see ``redis_script``), as UTF-8 (redis-py passes
        bytes on as they are; it would examine every text argument in Python)."""
        checks, finals = self.view.read, self.finals
        keys = [*self.keys.fixed_utf8, *(key.encode() for key in checks)]
        marks = []
        for key, (_, shape, (version, _)) in checks.items():
            final = finals.get(key)
            mark = "-" if final is None else "w" if final[1] else "e"
            marks.append(f"{shape[0]}{mark}{version}")
        counters = self.ch.counters  # how many values of each were used (ARGV 4 and 5)
        token, ticket = counters.get(TOKEN_COUNTER), counters.get(TICKET_COUNTER)
        args = [repr(now), repr(limits[0]), repr(limits[1]),
                str(token - SENTINEL) if token is not None else "0",
                str(ticket - (SENTINEL + SPAN)) if ticket is not None else "0",
                epoch, str(token_floor), _array(marks), _array(self._commands)]
        return keys, [arg.encode() for arg in args]

    # -- the reply -----------------------------------------------------------------------
    def stale(self, cache: Cache, found: list[Any], as_of: int) -> Snapshot:
        """Learn the current content of the keys whose check failed; returns the snapshot of
        Redis when the script ran (every key checked) at Redis time ``as_of``."""
        checks = list(self.view.read.items())
        snapshot: Snapshot = {key: entry for key, (_, _, entry) in checks}
        for i in range(0, len(found), 3):
            key, (_, shape, _) = checks[int(found[i]) - 1]
            entry = (str(found[i + 1]), parse(shape, found[i + 2]))
            snapshot[key] = entry
            cache.put(key, *entry, as_of=as_of)
        return snapshot

    def patch(self, obj: Any, bases: list[int]) -> Any:
        """``obj`` (the operation's result, or a record it wrote) with every sentinel value
        replaced by the real one; a record is patched once (its ``public()`` made once)."""
        if not bases:
            return obj
        if isinstance(obj, LockRecord):
            return self._patch_record(obj, bases)
        if isinstance(obj, bool):
            return obj
        if isinstance(obj, int):
            return _real(obj, bases)
        if isinstance(obj, list):
            return [self.patch(x, bases) for x in obj]
        if isinstance(obj, tuple):
            return tuple(self.patch(x, bases) for x in obj)
        return obj

    def _patch_record(self, rec: LockRecord, bases: list[int]) -> LockRecord:
        if rec.token < SENTINEL:
            return rec
        real = self._patched.get(id(rec))
        if real is None:
            real = self._patched[id(rec)] = replace(rec, token=_real(rec.token, bases))
        return real

    def done(self, cache: Cache, version: str, bases: list[int]) -> None:
        """The writes happened: remember every key written at its new version."""
        as_of = _version(version)
        for key, (shape, content) in self.finals.items():
            if bases and shape == RECORDS:
                content = {h: self._patch_record(r, bases) for h, r in content.items()}
            elif bases and shape == WAITERS:
                content = {_real(t, bases): replace(w, ticket=_real(w.ticket, bases))
                           for t, w in content.items()}
            cache.put(key, version if content else "", content, as_of)

    def events(self, ids: list[str], bases: list[int]) -> list[LockUpdateMessage]:
        """The events as appended: with their stream ids and real tokens."""
        messages = []
        for event, event_id in zip(self.ch.events, ids, strict=True):
            # The event's own record, patched once: the caller's answer patches the same
            # object, so both share one public(). Not the record stored last under the same
            # id: one operation may restore a lock and preempt it again (both carry the same
            # new token), and each event must show the lock as it was at that event.
            rec = self._patch_record(event.record, bases) if bases else event.record
            if rec is not event.record:
                event = replace(event, record=rec)  # every other field kept as it is
            messages.append(to_message(event, event_id))
        return messages
