"""The etcd store: the lock table in etcd v3, for sites that need no lost lock across a failover.

``--store etcd://HOST:PORT[,HOST:PORT...][/KEY_PREFIX][?max_txn_ops=N]`` (default prefix
``bs-coordination``; ``max_txn_ops``: the members' ``--max-txn-ops``, default 128, which bounds
how many devices one request may name: about 2 operations per device).
etcd replicates every write through Raft before it answers, so an acknowledged lock survives
the loss of any minority of members, leader included; reads are linearizable.

**Transactions** run on the shared engine (``stores/txn.py``): a logical key ``K`` is the etcd
key ``<prefix>/t/K``, its version the key's ``mod_revision``; a commit is one etcd ``Txn``
whose compares are ``mod_revision == version read`` for every key read, whose success branch
writes the keys, the events and the expiry index; when it fails, one read-only transaction
reads every compared key back (the snapshot the engine runs the operation again on).

**Time.** etcd has no clock a client can read (no ``TIME``), so the store's time is this
replica's system clock, never going back, under a check that makes every replica agree within
``MAX_CLOCK_SKEW`` (0.5 s): every commit writes the time it used to ``<prefix>/clock`` and only
commits if the time found there is less than its own time plus the bound. A replica whose clock
is behind another's by more than that is refused (503 "clock behind", logged) rather than
deciding leases on a wrong clock; replicas kept by NTP are within milliseconds. Leases stay
the lock table's ``expires_at``; etcd leases are not used (the lock table decides expiry, and
a lease would end a lock at a time of etcd's choosing, without an event).

**Events** are kept in order in etcd (``etcd_events``): every commit that appends events
writes them in one key under ``<prefix>/e/``; the key's ``mod_revision`` (the commit's
revision) orders them, and ids are ``<epoch>-<revision>-<index>`` (``epoch``: when this table
was created, in ms, so a new table's ids sort after a lost one's). The tail reads the log from
its position, then watches ``<prefix>/e/`` from the revision of that read: a client of replica
B sees locks taken through replica A, in order. The sweep trims the log to ``event_log_size``
commits.

**Fencing tokens and wait tickets** are not counters in etcd (every grant would then conflict
with every other, on any device, from any replica): the engine hands out placeholders and the
commit's revision fills them in (``filler``): token ``n`` of the commit at revision ``R`` is
``token_base + R * PER_COMMIT + n``, so tokens rise in commit order, service-wide. A record or
event stored with a placeholder is filled when read, from its key's ``mod_revision``; any later
rewrite stores the real value. ``<prefix>/meta`` holds the table's generation and
``token_base``, and every commit compares it: a prefix that was deleted, or a cluster rebuilt
empty, is noticed at the next commit (or sweep), reported through ``Store.data_lost``, and the
new table's ``token_base`` is above every token this replica saw and above the clock in
microseconds, so tokens never go back.

**Failing closed**: a request etcd could not serve, or whose outcome is unknown, raises
``StoreUnavailableError`` (503), naming host:port only. The next request tries again (another
member first after a failure), so the store heals by itself when etcd has a leader again.

Keep etcd's history compacted (``--auto-compaction-mode=revision
--auto-compaction-retention=100000`` or a periodic retention): every lock operation is a
revision.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import secrets
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

from bs_coordination.errors import InvalidRequestError, StoreUnavailableError
from bs_coordination.locktable import TOKEN_COUNTER, LockRecord, RecordId
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores.base import Clock, SystemClock
from bs_coordination.stores.etcd_client import EtcdClient, EtcdUnavailable, b64, prefix_end, unb64
from bs_coordination.stores.etcd_events import EtcdEventLog, event_json, revision_text
from bs_coordination.stores.txn import ABSENT, Commit, Engine, EngineStore, Outcome, Restart, Stored, patch, unplace

log = logging.getLogger(__name__)


DEFAULT_PREFIX = "bs-coordination"
#: How far apart the replicas' clocks may be (seconds); see the module docstring.
MAX_CLOCK_SKEW = 0.5
DEFAULT_EVENT_LOG_SIZE = 10_000
#: Seconds a request to etcd is awaited at most.
TIMEOUT = 2.0
#: Counter values (tokens, tickets) one commit may hand out.
PER_COMMIT = 1024
#: Operations one etcd transaction may hold (etcd's ``--max-txn-ops``, 128 by default): about
#: 2 per device of a request, so a request may name some 60 devices unless it is raised (on
#: every member, and with ``?max_txn_ops=N`` in the store URL).
MAX_TXN_OPS = 128


def parse_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``etcd://h1:p1,h2:p2/prefix`` -> endpoints and key prefix; ``ValueError`` naming the
    problem."""
    return _parse(url)[:2]  # type: ignore[return-value]


def max_txn_ops(url: str) -> int:
    """The URL's ``?max_txn_ops=N`` (etcd's ``--max-txn-ops`` of the members), else 128."""
    return int(_parse(url)[2])


def _parse(url: str) -> tuple[list[tuple[str, int]], str, int]:
    if not url.startswith("etcd://"):
        raise ValueError(f"store: {url[:80]!r} is not an etcd:// URL")
    rest, _, query = url[len("etcd://"):].partition("?")
    ops = MAX_TXN_OPS
    for option in filter(None, query.split("&")):
        name, _, value = option.partition("=")
        if name != "max_txn_ops" or not value.isdigit() or not 16 <= int(value) <= 1_000_000:
            raise ValueError(f"store: etcd URL option {option[:40]!r} is not max_txn_ops=N "
                             f"(16..1000000)")
        ops = int(value)
    hosts, _, prefix = rest.partition("/")
    endpoints = []
    for part in hosts.split(","):
        parsed = urlsplit(f"//{part}")
        try:
            port = parsed.port or 2379
        except ValueError:
            raise ValueError(f"store: etcd endpoint {part[:80]!r} has no valid port") from None
        if not parsed.hostname or parsed.password is not None or parsed.username is not None:
            raise ValueError(f"store: etcd endpoint {part[:80]!r} is not HOST:PORT")
        endpoints.append((parsed.hostname, port))
    prefix = prefix.strip("/") or DEFAULT_PREFIX
    return endpoints, prefix, ops


class _Lost(Exception):
    """The table's meta is not the one this store attached to."""

    def __init__(self, meta: str) -> None:
        self.meta = meta


def _micros(t: float) -> str:
    return f"{int(t * 1_000_000):020d}"


class EtcdStore(EtcdEventLog, EngineStore):
    """The lock table in etcd. ``EtcdStore("etcd://127.0.0.1:2379")``; ``clock``: this
    replica's clock (the system clock unless a test gives one)."""

    kind = "etcd"

    def __init__(self, url: str, *, timeout: float = TIMEOUT,
                 event_log_size: int = DEFAULT_EVENT_LOG_SIZE,
                 max_clock_skew: float = MAX_CLOCK_SKEW, clock: Clock | None = None) -> None:
        super().__init__()
        self.clock = clock or SystemClock()
        endpoints, prefix, self.max_txn_ops = _parse(url)
        self.client = EtcdClient(endpoints, timeout=timeout)
        self.where = self.client.where
        self.prefix = prefix + "/"
        self.event_log_size = event_log_size
        self.max_clock_skew = max_clock_skew
        self._last_now = 0.0
        # Room for the meta and clock checks and the clock and event-log writes. Fencing tokens
        # and tickets are assigned from the commit's revision (``_fill``), so operations on
        # unrelated devices never conflict, whichever replica runs them.
        self.engine = Engine(self, self._clock, on_commit=self._committed, max_ops=self.max_txn_ops - 4,
                             assigns_counters=True)
        #: Fencing tokens of this table start above this (in its meta; see ``_fill``).
        self.token_base = 0
        self._replica = secrets.token_hex(6)
        self._commits = itertools.count()
        #: The table's meta text (generation and epoch) this store works on; None until attached.
        self._meta: str | None = None
        self.epoch = 0
        self._attaching = asyncio.Lock()

    # -- keys ------------------------------------------------------------------------------
    def _key(self, logical: str) -> str:
        return f"{self.prefix}t/{logical}"

    @property
    def _meta_key(self) -> str:
        return f"{self.prefix}meta"

    @property
    def _clock_key(self) -> str:
        return f"{self.prefix}clock"

    def _expiry_key(self, name: str, key_hash: str, expires_at: float) -> str:
        return f"{self.prefix}x/{_micros(expires_at)}/{name}/{key_hash}"

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Attach to the table (creating it if the prefix is empty); an outage at start is
        logged, not fatal (503 until etcd answers, then the store heals)."""
        try:
            await self._attach(None)
        except StoreUnavailableError as exc:
            log.warning("%s", exc.message)

    async def close(self) -> None:
        await self.engine.close()
        await self.client.close()

    async def ping(self) -> None:
        """A linearizable read: it needs a member with a leader (a member cut off from its
        cluster answers its status, but not this)."""
        await self._range(self._meta_key, keys_only=True)

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool = False
                    ) -> dict[str, Any]:
        try:
            return await self.client.call(path, body, idempotent=idempotent)
        except EtcdUnavailable as exc:
            raise StoreUnavailableError(f"lock store unavailable: {exc}") from None

    async def _range(self, key: str, range_end: str | None = None, **options: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"key": b64(key), **options}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        return await self._call("kv/range", body, idempotent=True)

    # -- time ------------------------------------------------------------------------------
    def _clock(self) -> float:
        now = max(self.clock.now(), self._last_now)
        self._last_now = now
        return now

    async def now(self) -> float:
        return self._clock()

    # -- the table's generation ----------------------------------------------------------------
    async def _attach(self, stale: str | None) -> None:
        """Find (or create) the table's meta key. After a commit found that the meta ``stale``
        it named is gone, a different or new table is a data loss, reported once."""
        async with self._attaching:
            if self._meta != stale:
                return  # another operation attached meanwhile
            now = self._clock()
            token_base = max(int(now * 1_000_000), self.token_floor + 1)
            meta = json.dumps({"generation": secrets.token_hex(8), "epoch": int(now * 1000),
                               "token_base": token_base})
            reply = await self._call("kv/txn", {
                "compare": [{"key": b64(self._meta_key), "target": "CREATE", "result": "EQUAL",
                             "create_revision": "0"}],
                "success": [self._put(self._meta_key, meta), self._put(self._clock_key, _micros(now)),
                            self._put(self._trimmed_key, revision_text(0))],
                "failure": [{"request_range": {"key": b64(self._meta_key)}}]})
            created = bool(reply.get("succeeded"))
            if not created:
                kvs = reply["responses"][0]["response_range"].get("kvs", [])
                if not kvs:
                    raise StoreUnavailableError("lock store unavailable: etcd table meta vanished")
                meta = unb64(kvs[0]["value"])
            self._meta = meta
            self.epoch = int(json.loads(meta)["epoch"])
            self.token_base = int(json.loads(meta)["token_base"])
            self.engine.forget()
            if stale is None:
                if created:
                    log.info("etcd at %s holds no lock table under %r yet: starting one (fencing "
                             "tokens continue above the clock in microseconds)", self.where,
                             self.prefix)
                return
            self.data_lost(
                f"lock store lost its data: etcd at {self.where} no longer holds the lock table "
                f"this service was using under {self.prefix!r} (deleted, or the cluster was "
                f"rebuilt); every lock and queued request it held is gone, holders must lock "
                f"again. Fencing tokens continue above every token issued before (highest seen "
                f"here: {self.token_floor}).")

    async def _attached(self) -> str:
        if self._meta is None:
            await self._attach(None)
        assert self._meta is not None
        return self._meta

    # -- the engine's backend ----------------------------------------------------------------
    @staticmethod
    def _put(key: str, value: str) -> dict[str, Any]:
        return {"request_put": {"key": b64(key), "value": b64(value)}}

    def _delete(self, key: str) -> dict[str, Any]:
        return {"request_delete_range": {"key": b64(key)}}

    @staticmethod
    def _stored(response: dict[str, Any]) -> Stored:
        kvs = response["response_range"].get("kvs")
        if not kvs:
            return (ABSENT, None)
        return (int(kvs[0]["mod_revision"]), unb64(kvs[0]["value"]))

    async def read(self, keys: Collection[str]) -> dict[str, Stored]:
        """The engine's snapshot read: one read-only etcd transaction (one revision)."""
        keys = list(keys)
        reply = await self._call("kv/txn", {"success": [
            {"request_range": {"key": b64(self._key(k))}} for k in keys]})
        responses = reply.get("responses", [])
        return {k: self._stored(r) for k, r in zip(keys, responses, strict=True)}

    async def commit(self, commit: Commit) -> Outcome:
        try:
            return await self._commit(commit)
        except _Lost as lost:
            await self._attach(lost.meta)
            raise Restart from None

    async def _commit(self, commit: Commit) -> Outcome:
        """One etcd transaction: the checks, the table's meta and the clock compared; the
        writes, events and expiry index on success; the checked keys read back on failure."""
        meta = await self._attached()
        now = self._clock()
        compare = [{"key": b64(self._key(k)), "target": "MOD", "result": "EQUAL",
                    "mod_revision": str(v)} for k, v in commit.checks.items()]
        compare.append({"key": b64(self._meta_key), "target": "VALUE", "result": "EQUAL",
                        "value": b64(meta)})
        compare.append({"key": b64(self._clock_key), "target": "VALUE", "result": "LESS",
                        "value": b64(_micros(now + self.max_clock_skew))})
        success = []
        for k, text in commit.writes.items():
            success.append(self._delete(self._key(k)) if text is None else self._put(self._key(k), text))
        if commit.events:
            body = json.dumps([event_json(n, e) for n, e in commit.events], separators=(",", ":"))
            key = f"{self._events_start}{self._replica}-{next(self._commits)}"
            success.append(self._put(key, body))
        for name, key_hash, old, new in commit.expiry:
            if old is not None:
                success.append(self._delete(self._expiry_key(name, key_hash, old)))
            if new is not None:
                success.append(self._put(self._expiry_key(name, key_hash, new), ""))
        if success:
            success.append(self._put(self._clock_key, _micros(now)))
        checked = list(commit.checks)
        # On failure only what tells a lost table or a clock behind; the checked keys are read
        # afterwards (conflicts are rare; a shorter request is cheaper for etcd every time).
        failure = [{"request_range": {"key": b64(self._meta_key)}},
                   {"request_range": {"key": b64(self._clock_key)}}]
        size = max(len(compare), len(success))
        if size > self.max_txn_ops:  # the engine commits such an operation alone
            raise InvalidRequestError(
                f"this request needs {size} operations in one etcd transaction, more than the "
                f"{self.max_txn_ops} etcd allows (--max-txn-ops): lock fewer devices at once "
                f"(a key holding more: release it device by device), or raise --max-txn-ops on every "
                f"etcd member and add ?max_txn_ops=N to the store URL")
        reply = await self._call("kv/txn", {"compare": compare, "success": success, "failure": failure})
        if not reply.get("succeeded"):
            self._refused(meta, now, reply.get("responses", []))
            return Outcome(False, snapshot=await self.read(checked))
        revision = int(reply["header"]["revision"])
        versions = {k: (ABSENT if text is None else revision) for k, text in commit.writes.items()}
        return Outcome(True, versions=versions, fill=self.filler(revision),
                       event_ids=[f"{self.epoch}-{revision}-{n}" for n, _ in commit.events])

    def filler(self, version: Any) -> Callable[[int], int]:
        """The values a commit at revision ``version`` handed out: token ``n`` of it is
        ``token_base + revision * PER_COMMIT + n`` (so tokens rise in commit order and stay
        above every earlier table's), ticket ``n`` is ``revision * PER_COMMIT + n``."""
        return functools.partial(self._fill, int(version))

    def _fill(self, revision: int, value: int) -> int:
        counter, n = unplace(value) or ("", value)
        if not counter:
            return value
        if n >= PER_COMMIT:
            raise InvalidRequestError(f"one commit may hand out at most {PER_COMMIT - 1} tokens")
        base = self.token_base if counter == TOKEN_COUNTER else 0
        return base + revision * PER_COMMIT + n

    def _refused(self, meta: str, now: float, responses: list[dict[str, Any]]) -> None:
        """A commit whose checks failed: raise if because the table was lost (``_Lost``) or
        this replica's clock is behind (``StoreUnavailableError``)."""
        found_meta, found_clock = self._stored(responses[-2])[1], self._stored(responses[-1])[1]
        if found_meta != meta:
            raise _Lost(meta)
        if found_clock is not None and found_clock >= _micros(now + self.max_clock_skew):
            behind = int(found_clock) / 1e6 - now
            log.error("clock of this replica is %.3f s behind the time another replica of the "
                      "etcd store committed (allowed: %g s): refusing to decide leases on it",
                      behind, self.max_clock_skew)
            raise StoreUnavailableError(
                f"lock store unavailable: this replica's clock is {behind:.3f} s behind another "
                f"replica's (allowed {self.max_clock_skew:g} s); synchronise the clocks (NTP)")

    def _committed(self, messages: list[LockUpdateMessage]) -> None:
        self._saw(messages)
        self.notify_changed()

    # -- Store primitives --------------------------------------------------------------------
    async def _all_records(self) -> list[LockRecord]:
        start = self._key("r:")
        reply = await self._range(start, prefix_end(start))
        out: list[LockRecord] = []
        for kv in reply.get("kvs", []):
            fill = self.filler(kv["mod_revision"])  # a grant's record holds a placeholder token
            out.extend(patch(LockRecord.from_dict(d), fill) for d in json.loads(unb64(kv["value"])))
        return out

    async def _due(self, now: float, limit: int) -> list[RecordId]:
        start = f"{self.prefix}x/"
        reply = await self._range(start, f"{start}{_micros(now)}0", limit=str(limit), keys_only=True)
        due = []
        for kv in reply.get("kvs", []):
            _micros_text, name, key_hash = unb64(kv["key"])[len(start):].split("/")
            due.append((name, key_hash))
        return due

    async def sweep(self, limit: int = 1000) -> int:
        """Expire leases that ran out (in commits small enough for one etcd transaction: about
        8 operations per expired lock), and trim the event log."""
        per_commit = max(1, self.max_txn_ops // 8)
        gone = 0
        while gone < limit:
            expired = await super().sweep(min(per_commit, limit - gone))
            gone += expired
            if expired < per_commit:
                break
        await self._trim()
        return gone


__all__ = ["DEFAULT_PREFIX", "EtcdStore", "parse_url"]
