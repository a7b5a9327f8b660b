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

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from bs_coordination.locktable import (
    TICKET_COUNTER,
    TOKEN_COUNTER,
    Changes,
    Event,
    LockRecord,
    Waiter,
    ancestors,
)
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.base import to_message
from bs_coordination.stores.redis_codec import (
    event_json,
    number,
    parse_record,
    parse_waiter,
    record_body,
    record_json,
    waiter_json,
)
from bs_coordination.stores.redis_script import CAS_SHA, FIXED_KEYS, ascii_bulk, bulk, index

#: Entries in the cache before it is dropped (it is only a guess, never trusted).
CACHE_LIMIT = 50_000
#: Record texts remembered before they are dropped (``Cache.bodies``).
BODIES_LIMIT = 10_000

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


class Cache:
    """What this process last saw in Redis, per key: its version and parsed content. Only
    non-empty keys are kept (a key not here is guessed absent). Updated in the order Redis ran
    the calls (by the reply reader), so it never goes back in time."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        #: id(record) -> (the record, its ``record_body``) for records this process wrote:
        #: the event of their release (or expiry...) shows them without encoding them again.
        self.bodies: dict[int, tuple[LockRecord, str]] = {}

    def remember_body(self, rec: LockRecord, body: str) -> None:
        if len(self.bodies) >= BODIES_LIMIT:  # those of records replaced meanwhile stay
            self.bodies.clear()
        self.bodies[id(rec)] = (rec, body)

    def body(self, rec: LockRecord) -> str | None:
        """``rec``'s body if remembered (forgotten then: a record is written once, and
        leaves when the lock does)."""
        known = self.bodies.pop(id(rec), None)
        return known[1] if known is not None and known[0] is rec else None

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


def with_token(rec: LockRecord, token: int) -> LockRecord:
    """``dataclasses.replace(rec, token=token)``, spelled out: ``replace`` costs several times
    more, and every grant is patched (a test checks that both agree)."""
    return LockRecord(rec.device_name, rec.lock_type, rec.user_id, rec.key_hash, token,
                      rec.acquired_at, rec.expires_at, rec.reason, rec.plan_uid, rec.state,
                      rec.preempted_by, rec.ack_requested, rec.ack, rec.ack_deadline,
                      rec.acknowledged_at)


_key_bulks: dict[str, str] = {}


def _key_bulk(key: str) -> str:
    """``bulk(key)``, remembered (the same keys come back: a device's records, its names)."""
    text = _key_bulks.get(key)
    if text is None:
        if len(_key_bulks) >= 4096:
            _key_bulks.clear()
        text = _key_bulks[key] = bulk(key)
    return text


#: Parts of every call (``redis_script``): fixed texts, encoded once.
_EVALSHA = bulk("EVALSHA") + bulk(CAS_SHA)
#: Indexes of the fixed keys in KEYS (``KeySpace.fixed``).
_NAMES_KEY, _EXPIRY_KEY, _EVENTS_KEY = index(2), index(3), index(4)
_ZERO = index(0)
#: Command names with their argument counts.
_HSET, _HDEL = bulk("HSET") + index(2), bulk("HDEL") + index(1)
_SADD, _SREM = bulk("SADD") + index(1), bulk("SREM") + index(1)
_ZADD, _ZREM = bulk("ZADD") + index(2), bulk("ZREM") + index(1)
_XADD = bulk("XADD") + index(6)
_XADD_ARGS = "".join(map(bulk, ("MAXLEN", "~", str(rk.EVENTS_MAXLEN), "*", rk.EVENT_FIELD)))


def constants(keys: rk.KeySpace, max_ahead: float, max_delay: float) -> tuple[str, str]:
    """What every call of a store repeats, as RESP: the fixed keys, and ARGV 2 and 3."""
    return "".join(map(bulk, keys.fixed)), bulk(repr(max_ahead)) + bulk(repr(max_delay))


def generation(epoch: str, token_floor: int) -> str:
    """ARGV 6 and 7 of every ``CAS`` call, as RESP."""
    return bulk(epoch) + bulk(str(token_floor))


class Commit:
    """The one ``CAS`` call of an attempt: built from what the view read and the changes, as
    the RESP request itself (``request``)."""

    #: After a "stale" reply: Redis at the instant the script ran (``stale``).
    snapshot: Snapshot | None = None
    #: After an "ok" reply: each counter's reserved base (none if no counter was used).
    bases: list[int] = []

    def __init__(self, keys: rk.KeySpace, view: View, ch: Changes, now: float,
                 fixed: tuple[str, str], generation: str) -> None:
        """``fixed``: the store's ``constants``; ``generation``: ARGV 6 and 7 as RESP (the
        epoch the store attached to and its token floor: ``generation``)."""
        self.keys = keys
        self.view = view
        self.ch = ch
        # Versioned keys written: key -> (shape, content after the write, sentinels unfilled).
        self.finals: dict[str, tuple[str, Any]] = {}
        self._commands: list[str] = []  # RESP of the commands: name + n, key index, arguments
        self._arguments = 0  # bulk strings in ``_commands``
        self._bodies: dict[int, str] = {}  # id(record) -> its ``record_body``
        self._patched: dict[int, LockRecord] = {}  # id(record with a sentinel) -> real
        self._build_writes()
        self.request = self._encode(now, fixed, generation)

    # -- building ------------------------------------------------------------------------
    def _add1(self, head: str, key: str, arg: str) -> None:
        """Append a command of one argument (``head``: its name and argument count; ``key``:
        the index of its key)."""
        self._commands += (head, key, bulk(arg))
        self._arguments += 4

    def _add2(self, head: str, key: str, arg1: str, arg2: str) -> None:
        """Append a command of two arguments (as ``_add1``)."""
        self._commands += (head, key, bulk(arg1), bulk(arg2))
        self._arguments += 5

    def _key(self, key: str) -> str:
        """The index of ``key`` (a key this operation read) in KEYS."""
        return index(self.view.read[key][0])

    def _before(self, key: str, shape: str) -> Any:
        """Content of ``key`` as this operation read it (read now, and so checked, if the lock
        table did not: every key written is checked)."""
        if key in self.finals:
            return self.finals[key][1]
        return self.view.entry(key, shape)[1]

    def _body(self, rec: LockRecord) -> str:
        body = self._bodies.get(id(rec))
        if body is None:
            body = self.view.cache.body(rec) or record_body(rec, _text(rec.token))
            self._bodies[id(rec)] = body
        return body

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
            head = _SADD if after else _SREM
            for a in ancestors(name):
                under = k.under(a)
                names = self._before(under, NAMES)  # a frozenset
                self.finals[under] = (NAMES, names | {name} if after else names - {name})
                self._add1(head, self._key(under), name)
            self._add1(head, _NAMES_KEY, name)
        for rid, rec in ch.deletes.items():
            name, key_hash = rid
            self._add1(_HDEL, self._key(touched[name][0]), key_hash)
            self._key_set(k.key_names(key_hash), name, add=False)
            if rec.expires_at is not None:
                self._add1(_ZREM, _EXPIRY_KEY, rk.expiry_member(rid))
        for rid, rec in ch.puts.items():
            name, key_hash = rid
            self._commands += (_HSET, self._key(touched[name][0]), bulk(key_hash),
                               ascii_bulk(record_json(rec, self._body(rec))))
            self._arguments += 5
            self._key_set(k.key_names(key_hash), name, add=True)
            if rec.expires_at is not None:
                self._add2(_ZADD, _EXPIRY_KEY, number(rec.expires_at), rk.expiry_member(rid))
            else:
                old = self.view.entry(touched[name][0], RECORDS)[1].get(key_hash)
                if old is not None and old.expires_at is not None:
                    self._add1(_ZREM, _EXPIRY_KEY, rk.expiry_member(rid))
        if ch.waiters_put or ch.waiters_deleted:
            waiters = dict(self._before(k.waiters, WAITERS))
            for ticket in ch.waiters_deleted:
                waiters.pop(ticket, None)
                if ticket < SENTINEL:  # else queued and dropped within this operation
                    self._add1(_HDEL, self._key(k.waiters), str(ticket))
            for ticket, w in ch.waiters_put.items():
                waiters[ticket] = w
                self._add2(_HSET, self._key(k.waiters), _text(ticket),
                           waiter_json(w, _text(ticket)))
            self.finals[k.waiters] = (WAITERS, waiters)
        for event in ch.events:
            self._commands += (_XADD, _EVENTS_KEY, _XADD_ARGS,
                               ascii_bulk(event_json(event, self._body(event.record))))
            self._arguments += 9

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
        self._add1(_SADD if add else _SREM, self._key(key), name)

    def _encode(self, now: float, fixed: tuple[str, str], generation: str) -> bytes:
        """The ``EVALSHA`` request (see ``redis_script`` for its KEYS and ARGV)."""
        checks, finals = self.view.read, self.finals
        fixed_keys, limits = fixed
        keys = FIXED_KEYS + len(checks)
        parts = ["", _EVALSHA, index(keys), fixed_keys]
        marks = []
        for key, (_, shape, (version, _)) in checks.items():
            parts.append(_key_bulk(key))
            final = finals.get(key)
            mark = "-" if final is None else "w" if final[1] else "e"
            marks.append(f"${len(version) + 2}\r\n{shape[0]}{mark}{version}\r\n")
        parts += (ascii_bulk(number(now)), limits)
        counters = self.ch.counters  # how many values of each were used (ARGV 4 and 5)
        token, ticket = counters.get(TOKEN_COUNTER), counters.get(TICKET_COUNTER)
        parts.append(index(token - SENTINEL) if token is not None else _ZERO)
        parts.append(index(ticket - (SENTINEL + SPAN)) if ticket is not None else _ZERO)
        parts.append(generation)
        parts += marks
        parts += self._commands
        parts[0] = f"*{2 + 1 + keys + 7 + len(checks) + self._arguments}\r\n"
        return "".join(parts).encode()

    # -- the reply -----------------------------------------------------------------------
    def stale(self, cache: Cache, found: list[Any]) -> Snapshot:
        """Learn the current content of the keys whose check failed; returns the snapshot of
        Redis when the script ran (every key checked)."""
        checks = list(self.view.read.items())
        snapshot: Snapshot = {key: entry for key, (_, _, entry) in checks}
        for i in range(0, len(found), 3):
            key, (_, shape, _) = checks[int(found[i]) - 1]
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
            real = self._patched[id(rec)] = with_token(rec, _real(rec.token, bases))
        return real

    def done(self, cache: Cache, version: str, bases: list[int]) -> None:
        """The writes happened: remember every key written at its new version."""
        for key, (shape, content) in self.finals.items():
            if bases and shape == RECORDS:
                content = {h: self._patch_record(r, bases) for h, r in content.items()}
            elif bases and shape == WAITERS:
                content = {_real(t, bases): replace(w, ticket=_real(w.ticket, bases))
                           for t, w in content.items()}
            cache.put(key, version if content else "", content)
        for rec in self.ch.puts.values():
            body = self._bodies[id(rec)]
            if rec.token >= SENTINEL:
                real = self._patch_record(rec, bases)
                cache.remember_body(real, body.replace(_hole(rec.token), str(real.token), 1))
            else:
                cache.remember_body(rec, body)

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
                event = Event(event.action, rec, event.timestamp, event.actor)
            messages.append(to_message(event, event_id))
        return messages
