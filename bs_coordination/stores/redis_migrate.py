"""Moving a lock table of the old Redis layout (before the transaction engine) to the current
one, when a store attaches to a Redis that holds it: no lock, queued request or fencing-token
guarantee is lost by an upgrade.

``migrate`` reads the old keys (``redis_keys`` describes both layouts) under ``WATCH``, builds
the engine's logical keys from them with the same code the engine uses (``txn_backend.encode``),
and writes them in one ``MULTI``/``EXEC`` that also deletes the old keys and leaves the ``MOVED``
marker where the old version hash was. A write of a replica still running the old version
between the reads and the ``EXEC`` changes the version hash (every old commit did) and so
makes the ``EXEC`` fail; it is then read again. After it, such a replica's every call fails
(``WRONGTYPE`` on the marker: 503), closed, rather than writing a second table.

Every migrated key gets one version above everything the old table handed out (its ``~last``,
both counters, every token and ticket stored), so fencing tokens and wait tickets continue
above the old ones. The event stream, the set of names and the expiry index keep their keys
and formats.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import WatchError

from bs_coordination.locktable import LockRecord, Waiter, ancestors
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.redis_json import parse_record, parse_waiter
from bs_coordination.stores.txn_backend import (
    WAITERS_KEY,
    encode,
    key_names_key,
    records_key,
    under_key,
)

log = logging.getLogger(__name__)

#: ``EXEC`` attempts before giving up (each failed one met a write of an old replica).
ATTEMPTS = 10


async def migrate(client: Any, keys: rk.KeySpace, epoch: str, floor: int) -> bool:
    """Move the old layout under ``keys`` to the current one; ``epoch``: the table's epoch if
    the old one had none. False when another store had moved it already."""
    for _ in range(ATTEMPTS):
        try:
            return await _attempt(client, keys, epoch, floor)
        except WatchError:
            continue
    raise WatchError("the old lock table kept changing while it was migrated")


async def _attempt(client: Any, keys: rk.KeySpace, epoch: str, floor: int) -> bool:
    # Every old key a write of the old version touches, watched before it is read.
    old_fixed = [keys.versions, keys.names, keys.old_waiters, *keys.old_counters]
    stray: list[str] = []
    for kind in ("rec", "under", "key"):
        stray += [key async for key in client.scan_iter(match=keys.old_pattern(kind), count=1000)]
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.meta, *old_fixed, *stray)
        if await pipe.exists(keys.meta):
            return False  # another store moved it meanwhile
        versions: dict[str, str] = {}
        if await pipe.type(keys.versions) == "hash":
            versions = await pipe.hgetall(keys.versions)
        names = sorted(await pipe.smembers(keys.names))
        records: dict[str, list[LockRecord]] = {}
        for name in names:
            await pipe.watch(keys.old_records(name))
            texts = await pipe.hvals(keys.old_records(name))
            if texts:
                records[name] = [parse_record(t) for t in texts]
        waiters = [parse_waiter(t) for t in (await pipe.hvals(keys.old_waiters))]
        counters = [int(await pipe.get(k) or 0) for k in keys.old_counters]
        sec, usec = await pipe.time()
        highest = max([int(versions.get("~last") or 0), *counters, floor,
                       *(r.token for recs in records.values() for r in recs),
                       *(w.ticket for w in waiters)])
        version = max(int(sec) * 1_000_000 + int(usec), highest + 1)
        table = _logical(records, waiters)

        pipe.multi()
        # ``names`` is kept as it is (the same key in both layouts)
        old = {*stray, *old_fixed[2:], *(keys.old_records(n) for n in names)}
        if old:
            pipe.delete(*old)
        if table:
            pipe.mset({keys.table(k): f"{version} {text}" for k, text in table.items()})
        pipe.hset(keys.meta, mapping={rk.EPOCH_FIELD: versions.get("~epoch") or epoch,
                                      rk.LAST_FIELD: str(version)})
        pipe.set(keys.versions, rk.MOVED)
        await pipe.execute()
    log.warning("moved the lock table under %r to the current Redis layout: %d device(s) with "
                "locks, %d queued request(s); replicas of older versions can no longer write "
                "to it (upgrade them)", keys.prefix, len(records), len(waiters))
    return True


def _logical(records: dict[str, list[LockRecord]], waiters: list[Waiter]) -> dict[str, str]:
    """The engine's logical keys (their texts) holding ``records`` and ``waiters``."""
    under: dict[str, set[str]] = {}
    key_names: dict[str, set[str]] = {}
    out: dict[str, Any] = {}
    for name, recs in records.items():
        # Oldest first, as the memory store keeps them (a Redis hash had no useful order).
        recs.sort(key=lambda r: (r.acquired_at, r.token))
        out[records_key(name)] = {r.key_hash: r for r in recs}
        for a in ancestors(name):
            under.setdefault(a, set()).add(name)
        for r in recs:
            key_names.setdefault(r.key_hash, set()).add(name)
    for a, below in under.items():
        out[under_key(a)] = frozenset(below)
    for key_hash, names in key_names.items():
        out[key_names_key(key_hash)] = frozenset(names)
    if waiters:
        out[WAITERS_KEY] = {w.ticket: w for w in sorted(waiters, key=lambda w: w.ticket)}
    return {key: text for key, value in out.items() if (text := encode(key, value)) is not None}
