"""What a backend of the transaction engine (``stores/txn.py``) sees: the logical keys of the
lock table, their values as text, one ``Commit`` to write atomically and the ``Outcome`` it
answers, and the ``Backend`` protocol a networked store implements (``read`` and ``commit``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from bs_coordination.locktable import Event, LockRecord, Waiter

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
    #: (device name, key hash, expires_at before, expires_at after) for each record whose
    #: lease end changed (``None``: none, or no record): the expiry index to update.
    expiry: list[tuple[str, str, float | None, float | None]]
    #: What each operation of the batch was (the tag given to ``Engine.run``), in the order
    #: they ran: for logs and tests.
    tags: list[Any] = field(default_factory=list)


@dataclass
class Outcome:
    """A backend's answer to ``commit``: written (``ok``) or not (a check failed)."""

    ok: bool
    #: When ok: logical key -> the new version of each key written (deleted keys: ABSENT).
    versions: dict[str, Any] = field(default_factory=dict)
    #: When ok: the id of each event, in order.
    event_ids: list[str] = field(default_factory=list)
    #: When not ok: the current value of every checked key, read at one instant.
    snapshot: dict[str, Stored] = field(default_factory=dict)


class Backend(Protocol):
    async def read(self, keys: Collection[str]) -> dict[str, Stored]:
        """The current version and text of ``keys``, all at one instant (linearizable)."""

    async def commit(self, commit: Commit) -> Outcome:
        """Write ``commit`` atomically if every check holds; else answer a snapshot."""


class Restart(Exception):
    """Raised by a backend: drop the cache and run the batch again."""

EVENT_COUNTER = "event"


__all__ = ["ABSENT", "EVENT_COUNTER", "WAITERS_KEY", "Backend", "Commit", "Outcome", "Restart", "Stored",
           "counter_key", "decode", "encode", "key_names_key", "records_key", "under_key"]
