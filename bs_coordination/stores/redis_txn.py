"""The read side of a Redis transaction: what was read, what is missing, what to guess.

``View`` is the ``TableView`` the lock table runs on. It answers from a ``Snapshot`` (keys
read in this attempt, under ``WATCH`` or inside ``MULTI``) and, for anything not read yet,
notes the key in ``needs`` and answers from ``WatchCache``, a local copy of what this process
saw last. A run with needs is only a guess whose purpose is to name every key to fetch in
one round trip; only a run without needs is ever committed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from bs_coordination.locktable import Changes, LockRecord, Waiter, ancestors

#: Entries per cache map before it is dropped (it is only a guess, never trusted).
CACHE_LIMIT = 50_000


@dataclass
class Needs:
    """Keys an operation asked for that were not read in this attempt."""

    records: set[str] = field(default_factory=set)
    under: set[str] = field(default_factory=set)
    key_names: set[str] = field(default_factory=set)
    waiters: bool = False
    counters: dict[str, int] = field(default_factory=dict)  # name -> values to reserve

    def __bool__(self) -> bool:
        return bool(self.records or self.under or self.key_names or self.waiters
                    or self.counters)

    def union(self, other: Needs) -> Needs:
        counters = dict(self.counters)
        for name, n in other.counters.items():
            counters[name] = max(n, counters.get(name, 0))
        return Needs(self.records | other.records, self.under | other.under,
                     self.key_names | other.key_names, self.waiters or other.waiters, counters)


@dataclass
class Snapshot:
    """What one attempt has read (all of it still watched, when writing)."""

    records: dict[str, dict[str, LockRecord]] = field(default_factory=dict)
    under: dict[str, set[str]] = field(default_factory=dict)
    key_names: dict[str, set[str]] = field(default_factory=dict)
    waiters: list[Waiter] | None = None
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (base, top]
    now: float | None = None
    rounds: int = 0
    read: Needs = field(default_factory=Needs)

    def reset(self) -> None:
        """Forget the data (a read-only round reads everything again, as one snapshot)."""
        self.records, self.under, self.key_names = {}, {}, {}
        self.waiters, self.counters = None, {}

    def set_time(self, value: list[str]) -> None:
        self.now = int(value[0]) + int(value[1]) / 1e6

    def set_records(self, name: str, values: Iterable[str]) -> None:
        # Oldest first, as the memory store keeps them (a Redis hash has no useful order),
        # so both stores name the same holder first in a refusal.
        recs = sorted((LockRecord.from_dict(json.loads(v)) for v in values),
                      key=lambda r: (r.acquired_at, r.token))
        self.records[name] = {r.key_hash: r for r in recs}

    def set_under(self, name: str, values: Iterable[str]) -> None:
        self.under[name] = set(values)

    def set_key_names(self, key_hash: str, values: Iterable[str]) -> None:
        self.key_names[key_hash] = set(values)

    def set_waiters(self, values: Iterable[str]) -> None:
        self.waiters = [Waiter.from_dict(json.loads(v)) for v in values]

    def set_counter(self, name: str, count: int, top: str | int | None) -> None:
        """``top``: the counter after reserving ``count`` values (``INCRBY``), or its value
        (``GET``, ``count`` 0)."""
        value = int(top or 0)
        self.counters[name] = (value - count, value)

    def counters_to_reserve(self, needs: Needs) -> dict[str, int]:
        """Every counter this attempt uses is reserved again in each round, after that round's
        ``WATCH``: a value reserved before a watched key was read could be smaller than the
        token of a grant committed on that key in between."""
        out = {name: top - base for name, (base, top) in self.counters.items()}
        for name, n in needs.counters.items():
            out[name] = max(n, out.get(name, 0))
        return {name: max(n, 1) for name, n in out.items()}

    def apply(self, ch: Changes) -> dict[str, tuple[bool, dict[str, LockRecord]]]:
        """Per touched name: (had records before, its records after ``ch``)."""
        out: dict[str, tuple[bool, dict[str, LockRecord]]] = {}

        def slot(name: str) -> dict[str, LockRecord]:
            if name not in out:
                before = self.records[name]  # the lock table read every name it changes
                out[name] = (bool(before), dict(before))
            return out[name][1]

        for (name, key_hash) in ch.deletes:
            slot(name).pop(key_hash, None)
        for (name, key_hash), rec in ch.puts.items():
            slot(name)[key_hash] = rec
        return out


class WatchCache:
    """What this process last saw in Redis: used to guess which keys an operation will need."""

    def __init__(self) -> None:
        self.records: dict[str, list[LockRecord]] = {}
        self.under: dict[str, set[str]] = {}
        self.key_names: dict[str, set[str]] = {}
        self.waiters: list[Waiter] = []

    @staticmethod
    def _put(d: dict, key: str, value: object) -> None:  # type: ignore[type-arg]
        if len(d) >= CACHE_LIMIT and key not in d:
            d.clear()
        d[key] = value

    def learn(self, snap: Snapshot) -> None:
        for name, recs in snap.records.items():
            self._put(self.records, name, list(recs.values()))
        for name, names in snap.under.items():
            self._put(self.under, name, set(names))
        for key_hash, names in snap.key_names.items():
            self._put(self.key_names, key_hash, set(names))
        if snap.waiters is not None:
            self.waiters = list(snap.waiters)

    def commit(self, final: dict[str, tuple[bool, dict[str, LockRecord]]], ch: Changes) -> None:
        for name, (before, after) in final.items():
            self._put(self.records, name, list(after.values()))
            if before != bool(after):
                for a in ancestors(name):
                    names = self.under.get(a)
                    if names is not None:
                        (names.add if after else names.discard)(name)
        for (name, key_hash) in ch.deletes:
            self.key_names.get(key_hash, set()).discard(name)
        for (name, key_hash) in ch.puts:
            self.key_names.setdefault(key_hash, set()).add(name)
        if ch.waiters_put or ch.waiters_deleted:
            by_ticket = {w.ticket: w for w in self.waiters}
            for t in ch.waiters_deleted:
                by_ticket.pop(t, None)
            by_ticket.update(ch.waiters_put)
            self.waiters = list(by_ticket.values())


class View:
    """A ``TableView`` over a snapshot that notes (and guesses) what it has not read."""

    def __init__(self, snap: Snapshot, cache: WatchCache) -> None:
        self.snap = snap
        self.cache = cache
        self.needs = Needs()

    def records_at(self, name: str) -> Iterable[LockRecord]:
        recs = self.snap.records.get(name)
        if recs is not None:
            return recs.values()
        self.needs.records.add(name)
        return self.cache.records.get(name, ())

    def names_under(self, name: str) -> Iterable[str]:
        names = self.snap.under.get(name)
        if names is not None:
            return names
        self.needs.under.add(name)
        return self.cache.under.get(name, ())

    def names_of_key(self, key_hash: str) -> Iterable[str]:
        names = self.snap.key_names.get(key_hash)
        if names is not None:
            return names
        self.needs.key_names.add(key_hash)
        return self.cache.key_names.get(key_hash, ())

    def waiters(self) -> Iterable[Waiter]:
        if self.snap.waiters is not None:
            return self.snap.waiters
        self.needs.waiters = True
        return self.cache.waiters

    def counter(self, name: str) -> int:
        """The base of this attempt's reservation (a guessed 0 before one is made)."""
        reserved = self.snap.counters.get(name)
        if reserved is not None:
            return reserved[0]
        self.needs.counters[name] = 1
        return 0

    def check_counters(self, ch: Changes) -> None:
        """Note a counter that used more values than were reserved (reserve more, run again)."""
        for name, used_top in ch.counters.items():
            base, top = self.snap.counters.get(name, (0, 0))
            if used_top > top:
                self.needs.counters[name] = used_top - base
