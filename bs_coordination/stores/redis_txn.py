"""The Redis store's optimistic transaction: what an operation read, at which version, and the
one compare-and-swap call (``redis_script.CAS``) that commits it. ``redis`` explains the design.

``View`` is the ``TableView`` the lock table runs on. It answers from a ``Snapshot`` (a view of
Redis at one instant, from the reply of the previous attempt) or else from ``Cache`` (what this
process saw last, a key never seen guessed absent), and notes every key it answered with the
version it answered from. ``Commit`` turns that read set and ``txn.changes()`` into one call:
the checks, the counters to reserve, the write commands, the events; and applies the reply.

Counters are never read. ``View.counter`` answers a *sentinel* base far above any real value,
so the values an operation hands out are recognisable; where one is written (a record's
``token``, a waiter's ``ticket``) the text carries a hole that the script fills from the value
it reserved with ``INCRBY`` in the same call. Tokens are therefore handed out in commit order,
and contention on the one fencing counter never makes an operation start over.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from bs_coordination.locktable import Changes, LockRecord, Waiter, ancestors
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.base import to_message
from bs_coordination.stores.redis_script import CAS_SHA

#: Entries in the cache before it is dropped (it is only a guess, never trusted).
CACHE_LIMIT = 50_000

#: Base of the values ``View.counter`` answers: counter ``c`` (0-based) answers
#: ``SENTINEL + c * SPAN``, so its n-th value this operation is ``SENTINEL + c * SPAN + n``.
SENTINEL = 1 << 60
SPAN = 1 << 32

#: Shapes of what a key holds; the first letter is the script's kind (hash or set).
RECORDS = "h:records"
WAITERS = "h:waiters"
NAMES = "s:names"

#: (version, parsed content); version "" means the key is absent (content empty).
Entry = tuple[str, Any]
_EMPTY: dict[str, Any] = {RECORDS: {}, WAITERS: {}, NAMES: frozenset()}


def parse(shape: str, values: Iterable[str]) -> Any:
    """Content of a key as the script returns it (``HVALS`` / ``SMEMBERS``)."""
    if shape == NAMES:
        return frozenset(values)
    if shape == WAITERS:
        waiters = (Waiter.from_dict(json.loads(v)) for v in values)
        return {w.ticket: w for w in sorted(waiters, key=lambda w: w.ticket)}
    # Oldest first, as the memory store keeps them (a Redis hash has no useful order), so
    # both stores name the same holder first in a refusal.
    recs = sorted((LockRecord.from_dict(json.loads(v)) for v in values),
                  key=lambda r: (r.acquired_at, r.token))
    return {r.key_hash: r for r in recs}


class Cache:
    """What this process last saw in Redis, per key: its version and parsed content. Only
    non-empty keys are kept (a key not here is guessed absent). Updated in the order Redis ran
    the calls (by the reply reader), so it never goes back in time."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def put(self, key: str, version: str, content: Any) -> None:
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
        self.read: dict[str, tuple[str, Entry]] = {}  # key -> (shape, entry answered)
        self.counters: dict[str, int] = {}  # counter name -> its number in this operation
        self.fresh = snapshot is not None  # every answer came from the snapshot

    def entry(self, key: str, shape: str) -> Entry:
        seen = self.read.get(key)
        if seen is not None:
            return seen[1]
        entry = self.snapshot.get(key) if self.snapshot is not None else None
        if entry is None:
            self.fresh = False
            entry = self.cache.get(key) or ("", _EMPTY[shape])
        self.read[key] = (shape, entry)
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
        number = self.counters.setdefault(name, len(self.counters))
        return SENTINEL + number * SPAN


def _hole(value: int) -> str:
    number, offset = divmod(value - SENTINEL, SPAN)
    return f"\1{number + 1}:{offset}\1"


def _real(value: int, bases: list[int]) -> int:
    if value < SENTINEL:
        return value
    number, offset = divmod(value - SENTINEL, SPAN)
    return bases[number] + offset


def _with_hole(text: str, field: str, value: int) -> str:
    """``text`` (JSON) with its top-level ``field`` (a counter value) as a hole. A quote inside
    a JSON string is always escaped, so ``"field":`` can only be that key."""
    if value < SENTINEL:
        return text
    return text.replace(f'"{field}":{value}', f'"{field}":{_hole(value)}', 1)


_MAXLEN = str(rk.EVENTS_MAXLEN)


#: Built once: ``json.dumps`` with any option builds a new encoder on every call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_dump = _JSON.encode


class Commit:
    """The one ``CAS`` call of an attempt: built from what the view read and the changes."""

    def __init__(self, keys: rk.KeySpace, view: View, ch: Changes, now: float,
                 max_ahead: float, max_delay: float) -> None:
        self.keys = keys
        self.view = view
        self.ch = ch
        self._key_list: list[str] = []
        self._key_index: dict[str, int] = {}
        # Versioned keys written: key -> (shape, content after the write, sentinels unfilled).
        self.finals: dict[str, tuple[str, Any]] = {}
        self._commands: list[Any] = []
        self._texts: list[str] = []  # ARGV[5:]
        self._count = 0
        self._xadds: list[int] = []
        self.messages: list[LockUpdateMessage] = []
        #: After a "stale" reply: Redis at the instant the script ran (``stale``).
        self.snapshot: Snapshot | None = None
        self._patched: dict[int, LockRecord] = {}  # id(record with a sentinel) -> real
        #: After an "ok" reply: each counter's reserved base.
        self.bases: list[int] = []
        self._build_writes()
        index = self._index
        self.checks = list(view.read.items())
        checks: list[Any] = []
        for key, (shape, (version, _)) in self.checks:
            checks += [index(key), shape[0], version]
        counters: list[int] = []
        if ch.counters:
            for name, number in view.counters.items():  # in number order
                used = ch.counters[name] - (SENTINEL + number * SPAN)
                counters += [index(keys.counter(name)), used]
        written = [index(key) for key, (_, content) in self.finals.items() if content]
        emptied = [index(key) for key, (_, content) in self.finals.items() if not content]
        self._key_list.append(keys.versions)
        self._args = (repr(now), repr(max_ahead), repr(max_delay),
                      _dump([checks, counters, written, emptied, self._commands]),
                      *self._texts)

    # -- building ------------------------------------------------------------------------
    def _index(self, key: str) -> int:
        index = self._key_index.get(key)
        if index is None:
            self._key_list.append(key)
            index = self._key_index[key] = len(self._key_list)
        return index

    def _add(self, name: str, key: str | None, *args: Any) -> int:
        self._commands += [name, self._index(key) if key is not None else 0, len(args), *args]
        self._count += 1
        return self._count - 1

    def _text(self, text: str) -> int:
        """A long argument, sent as ARGV[i]; returns i."""
        self._texts.append(text)
        return len(self._texts) + 4

    def _before(self, key: str, shape: str) -> Any:
        """Content of ``key`` as this operation read it (read now, and so checked, if the lock
        table did not: every key written is checked)."""
        if key in self.finals:
            return self.finals[key][1]
        return self.view.entry(key, shape)[1]

    def _build_writes(self) -> None:
        k, ch = self.keys, self.ch
        touched: dict[str, tuple[bool, dict[str, LockRecord]]] = {}
        for (name, key_hash) in ch.deletes:
            self._records(touched, name).pop(key_hash, None)
        for (name, key_hash), rec in ch.puts.items():
            self._records(touched, name)[key_hash] = rec
        for name, (had, after) in touched.items():
            self.finals[k.records(name)] = (RECORDS, after)
            if had == bool(after):
                continue
            verb = "SADD" if after else "SREM"
            for a in ancestors(name):
                key = k.under(a)
                names = set(self._before(key, NAMES))
                (names.add if after else names.discard)(name)
                self.finals[key] = (NAMES, frozenset(names))
                self._add(verb, key, name)
            self._add(verb, k.names, name)
        for rid, rec in ch.deletes.items():
            name, key_hash = rid
            self._add("HDEL", k.records(name), key_hash)
            self._key_set(k.key_names(key_hash), name, add=False)
            if rec.expires_at is not None:
                self._add("ZREM", k.expiry, rk.expiry_member(rid))
        for rid, rec in ch.puts.items():
            name, key_hash = rid
            text = _with_hole(_dump(rec.to_dict()), "token", rec.token)
            self._add("HSET", k.records(name), key_hash, self._text(text))
            self._key_set(k.key_names(key_hash), name, add=True)
            if rec.expires_at is not None:
                self._add("ZADD", k.expiry, repr(rec.expires_at), rk.expiry_member(rid))
            else:
                old = self.view.entry(k.records(name), RECORDS)[1].get(key_hash)
                if old is not None and old.expires_at is not None:
                    self._add("ZREM", k.expiry, rk.expiry_member(rid))
        if ch.waiters_put or ch.waiters_deleted:
            waiters = dict(self._before(k.waiters, WAITERS))
            for ticket in ch.waiters_deleted:
                waiters.pop(ticket, None)
                if ticket < SENTINEL:  # else queued and dropped within this operation
                    self._add("HDEL", k.waiters, str(ticket))
            for ticket, w in ch.waiters_put.items():
                waiters[ticket] = w
                field = _hole(ticket) if ticket >= SENTINEL else str(ticket)
                self._add("HSET", k.waiters, self._text(field),
                          self._text(_with_hole(_dump(w.to_dict()), "ticket", ticket)))
            self.finals[k.waiters] = (WAITERS, waiters)
        for event in ch.events:
            m = to_message(event, "")
            self.messages.append(m)
            text = _with_hole(m.model_dump_json(exclude={"event_id"}), "token", m.lock.token)
            self._xadds.append(self._add("XADD", k.events, "MAXLEN", "~", _MAXLEN, "*",
                                         rk.EVENT_FIELD, self._text(text)))

    def _records(self, touched: dict[str, tuple[bool, dict[str, LockRecord]]],
                 name: str) -> dict[str, LockRecord]:
        slot = touched.get(name)
        if slot is None:
            before = self._before(self.keys.records(name), RECORDS)
            slot = touched[name] = (bool(before), dict(before))
        return slot[1]

    def _key_set(self, key: str, name: str, *, add: bool) -> None:
        before = self._before(key, NAMES)
        if (name in before) == add:
            return  # unchanged: no write, no new version
        names = set(before)
        (names.add if add else names.discard)(name)
        self.finals[key] = (NAMES, frozenset(names))
        self._add("SADD" if add else "SREM", key, name)

    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", CAS_SHA, len(self._key_list), *self._key_list, *self._args)

    # -- the reply -----------------------------------------------------------------------
    def stale(self, cache: Cache, found: list[Any]) -> Snapshot:
        """Learn the current content of the keys whose check failed; returns the snapshot of
        Redis when the script ran (every key checked)."""
        snapshot: Snapshot = {key: entry for key, (_, entry) in self.checks}
        for i in range(0, len(found), 3):
            key, (shape, _) = self.checks[int(found[i]) - 1]
            entry = (str(found[i + 1]), parse(shape, found[i + 2]))
            snapshot[key] = entry
            cache.put(key, *entry)
        return snapshot

    def patch(self, obj: Any, bases: list[int]) -> Any:
        """``obj`` (the operation's result, or a record it wrote) with every sentinel value
        replaced by the real one; a record is patched once (its ``public()`` made once)."""
        if not bases:
            return obj
        if isinstance(obj, LockRecord):
            if obj.token < SENTINEL:
                return obj
            real = self._patched.get(id(obj))
            if real is None:
                real = self._patched[id(obj)] = replace(obj, token=_real(obj.token, bases))
            return real
        if isinstance(obj, bool):
            return obj
        if isinstance(obj, int):
            return _real(obj, bases)
        if isinstance(obj, list):
            return [self.patch(x, bases) for x in obj]
        if isinstance(obj, tuple):
            return tuple(self.patch(x, bases) for x in obj)
        return obj

    def done(self, cache: Cache, version: str, bases: list[int]) -> None:
        """The writes happened: remember every key written at its new version."""
        for key, (shape, content) in self.finals.items():
            if bases and shape == RECORDS:
                content = {h: self.patch(r, bases) for h, r in content.items()}
            elif bases and shape == WAITERS:
                content = {_real(t, bases): replace(w, ticket=_real(w.ticket, bases))
                           for t, w in content.items()}
            cache.put(key, version if content else "", content)

    def events(self, replies: list[Any], bases: list[int]) -> list[LockUpdateMessage]:
        """The events as appended: with their stream ids and real tokens (the messages built
        for the script, completed in place: nobody else holds them)."""
        for m, event, i in zip(self.messages, self.ch.events, self._xadds, strict=True):
            m.event_id = replies[i]
            if event.record.token >= SENTINEL:
                # The event's own record, patched once: the caller's answer patches the same
                # object, so both share one public(). Not the record stored last under the same
                # id: one operation may restore a lock and preempt it again (both carry the
                # same new token), and each event must show the lock as it was at that event.
                m.lock = self.patch(event.record, bases).public()
        return self.messages
