"""What a backend of the transaction engine (``stores/txn.py``) sees: the logical keys of the
lock table, their values as text, one ``Commit`` to write atomically and the ``Outcome`` it
answers, and the ``Backend`` protocol a networked store implements (``read`` and ``commit``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Protocol

from bs_coordination.locktable import TICKET_COUNTER, TOKEN_COUNTER, Event, LockRecord, Waiter

#: The version of a key that does not exist.
ABSENT = 0
#: (version, text or None when absent), as a backend stores it.
Stored = tuple[Any, str | None]


def records_key(name: str) -> str:
    return f"r:{name}"


def under_key(name: str) -> str:
    return f"u:{name}"


def key_names_key(key_hash: str) -> str:
    return f"k:{key_hash}"


WAITERS_KEY = "w"


def counter_key(name: str) -> str:
    return f"c:{name}"


# -- values as text --------------------------------------------------------------------------

def decode(key: str, text: str | None) -> Any:
    """The parsed value of a logical key (its empty value when absent)."""
    kind = key[0]
    if kind == "r":
        return {} if text is None else {r.key_hash: r for r in map(LockRecord.from_dict, json.loads(text))}
    if kind in "uk":
        return frozenset() if text is None else frozenset(json.loads(text))
    if kind == "w":
        return {} if text is None else {w.ticket: w for w in map(Waiter.from_dict, json.loads(text))}
    return 0 if text is None else int(text)


def encode(key: str, value: Any) -> str | None:
    """The text of a logical key's value; ``None`` (delete the key) when it is empty."""
    if not value:
        return None
    kind = key[0]
    if kind == "r":
        return json.dumps([r.to_dict() for r in value.values()], separators=(",", ":"))
    if kind in "uk":
        return json.dumps(sorted(value), separators=(",", ":"))
    if kind == "w":
        return json.dumps([w.to_dict() for w in value.values()], separators=(",", ":"))
    return str(value)


# -- the backend interface --------------------------------------------------------------------

@dataclass
class Commit:
    """One atomic write, conditional on ``checks``."""

    #: logical key -> the version it was read at (``ABSENT``: it must not exist).
    checks: dict[str, Any]
    #: logical key -> its new text, ``None`` to delete it.
    writes: dict[str, str | None]
    #: (event number, event), to append to the log.
    events: list[tuple[int, Event]]
    #: (device name, key hash, due_at before, due_at after) for each record whose
    #: ``LockRecord.due_at`` (lease end, or pending handshake deadline) changed (``None``:
    #: none, or no record): the expiry index to update.
    expiry: list[tuple[str, str, float | None, float | None]]
    #: What each operation of the batch was (the tag given to ``Engine.run``), in the order
    #: they ran: for logs and tests.
    tags: list[Any] = field(default_factory=list)
    #: The store time the operations ran at (``clock()`` of this attempt): a backend whose
    #: service has a clock may check it against that clock (Redis ``TIME``).
    now: float = 0.0
    #: With ``Engine(assigns_counters=True)``: how many values of each counter the commit
    #: handed out (placeholders ``1..n``), for a backend that reserves them.
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class Outcome:
    """A backend's answer to ``commit``: written (``ok``) or not (a check failed)."""

    ok: bool
    #: When ok: logical key -> the new version of each key written (deleted keys: ABSENT).
    versions: dict[str, Any] = field(default_factory=dict)
    #: When ok: the id of each event, in order.
    event_ids: list[str] = field(default_factory=list)
    #: When ok and the backend assigns counters: the real value of each placeholder.
    fill: Callable[[int], int] | None = None
    #: When not ok: the current value of every checked key, read at one instant.
    snapshot: dict[str, Stored] = field(default_factory=dict)


class Backend(Protocol):
    async def read(self, keys: Collection[str]) -> dict[str, Stored]:
        """The current version and text of ``keys``, all at one instant (linearizable)."""

    async def commit(self, commit: Commit) -> Outcome:
        """Write ``commit`` atomically if every check holds; else answer a snapshot."""

    def filler(self, version: Any) -> Callable[[int], int]:
        """Only for ``Engine(assigns_counters=True)``: the real value of each placeholder in a
        value stored at ``version`` (written by the commit that made that version)."""


class Restart(Exception):
    """Raised by a backend: drop the cache and run the batch again."""

EVENT_COUNTER = "event"


#: Placeholders for counter values a backend assigns: counter ``COUNTERS[c]``'s ``n``-th value
#: in one commit is ``SENTINEL + c * SPAN + n`` until the backend names the real one.
SENTINEL = 1 << 60
SPAN = 1 << 32
COUNTERS = (TOKEN_COUNTER, TICKET_COUNTER)


# -- counters the backend assigns ---------------------------------------------------------

def placeholder(counter: str, n: int) -> int:
    """The stand-in for the ``n``-th value of ``counter`` one commit hands out, when the
    backend assigns counter values (``Engine(assigns_counters=True)``)."""
    return SENTINEL + COUNTERS.index(counter) * SPAN + n


def unplace(value: int) -> tuple[str, int] | None:
    """(counter, n) of a placeholder; None for a real value."""
    if value < SENTINEL:
        return None
    index, n = divmod(value - SENTINEL, SPAN)
    return COUNTERS[index], n


def patch(obj: Any, fill: Callable[[int], int]) -> Any:
    """``obj`` with every placeholder replaced by ``fill(placeholder)``: records' tokens,
    waiters' tickets, plain numbers, inside lists, tuples, dicts and dataclasses."""
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return fill(obj) if obj >= SENTINEL else obj
    if isinstance(obj, LockRecord):
        return replace(obj, token=fill(obj.token)) if obj.token >= SENTINEL else obj
    if isinstance(obj, Waiter):
        return replace(obj, ticket=fill(obj.ticket)) if obj.ticket >= SENTINEL else obj
    if isinstance(obj, list):
        return [patch(o, fill) for o in obj]
    if isinstance(obj, tuple):
        return tuple(patch(o, fill) for o in obj)
    if isinstance(obj, dict):
        return {patch(k, fill): patch(v, fill) for k, v in obj.items()}
    if isinstance(obj, Event):
        return replace(obj, record=patch(obj.record, fill))
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: patch(getattr(obj, f.name), fill) for f in fields(obj) if f.init})
    return obj


__all__ = [
    "ABSENT",
    "COUNTERS",
    "EVENT_COUNTER",
    "SENTINEL",
    "SPAN",
    "WAITERS_KEY",
    "Backend",
    "Commit",
    "Outcome",
    "Restart",
    "Stored",
    "counter_key",
    "decode",
    "encode",
    "key_names_key",
    "patch",
    "placeholder",
    "records_key",
    "under_key",
    "unplace",
]
