"""The etcd store's event log: the events of each commit in one key under ``<prefix>/e/``, in
the order etcd committed them (the keys' ``mod_revision``), read by position and followed with
an etcd watch (``EtcdEventLog``, a part of ``EtcdStore``; ``etcd`` explains the layout).

An event's id is ``<epoch>-<revision>-<index>``: the table's epoch (ms when it was created, so
a new table's ids sort after a lost one's), the revision of the commit that appended it, and
its place among that commit's events. ``<prefix>/trimmed`` holds the newest revision whose
events the sweep dropped (it is raised before they are deleted), so a reader asking for an
older position is told it is gone (``EventGap``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from bs_coordination.errors import InvalidRequestError, StoreUnavailableError
from bs_coordination.locktable import Event, LockRecord
from bs_coordination.models import LockAction, LockUpdateMessage
from bs_coordination.stores.base import EventGap, to_message
from bs_coordination.stores.etcd_client import EtcdClient, EtcdUnavailable, b64, prefix_end, unb64
from bs_coordination.stores.txn import Engine, patch

log = logging.getLogger(__name__)

#: Commits' event keys read per range while catching up.
PAGE = 1000
Position = tuple[int, int]  # (revision, index): the position of an event in the log


def event_json(n: int, e: Event) -> list[Any]:
    """One event as stored: ``[index, action, record, timestamp, actor, reason]``."""
    return [n, e.action.value, e.record.to_dict(), e.timestamp, e.actor, e.reason]


def revision_text(revision: int) -> str:
    return f"{revision:020d}"


class EtcdEventLog:
    """The event log part of ``EtcdStore`` (which provides the attributes declared here)."""

    prefix: str
    epoch: int
    event_log_size: int
    where: str
    client: EtcdClient
    engine: Engine
    #: The highest fencing token this replica saw (a new table starts above it).
    token_floor: int = 0
    #: Events appended or read since the sweep last looked at the log's length.
    _since_trim: int = 0
    #: Seconds a quiet watch is kept before it is read anew (ends a silently dead connection).
    watch_idle: float = 30.0

    async def _range(self, key: str, range_end: str | None = None, **options: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    async def _attached(self) -> str:
        raise NotImplementedError

    def filler(self, version: Any) -> Callable[[int], int]:
        raise NotImplementedError

    @property
    def _events_start(self) -> str:
        return f"{self.prefix}e/"

    @property
    def _trimmed_key(self) -> str:
        return f"{self.prefix}trimmed"

    def _saw(self, messages: list[LockUpdateMessage]) -> None:
        """Events appended here or read from the log: their tokens raise the floor."""
        for msg in messages:
            if msg.lock.token > self.token_floor:
                self.token_floor = msg.lock.token
        self._since_trim += len(messages)

    # -- positions and ids ------------------------------------------------------------------
    def _position(self, event_id: str) -> Position:
        """The position of ``event_id`` in this table (``0``: before the first); ``EventGap``
        for another table's id, ``InvalidRequestError`` for no id at all."""
        if event_id in ("0", "0-0"):
            return (0, 0)
        try:
            epoch, revision, index = (int(p) for p in event_id.split("-"))
        except (ValueError, AttributeError):
            raise InvalidRequestError(
                f"since: {str(event_id)[:40]!r} is not an event id of this service", field="since") from None
        if epoch != self.epoch:
            raise EventGap(f"event {event_id} belongs to another lock table")
        return (revision, index)

    def _decode(self, kvs: list[dict[str, Any]], after: Position) -> list[LockUpdateMessage]:
        """The events of the commits ``kvs`` (oldest first) after position ``after``."""
        out = []
        for kv in kvs:
            revision = int(kv["mod_revision"])
            if revision < after[0]:
                continue
            fill = self.filler(revision)
            for n, action, rec, ts, actor, *more in json.loads(unb64(kv["value"])):
                if (revision, n) > after:
                    record = patch(LockRecord.from_dict(rec), fill)
                    reason = more[0] if more else None  # events written before had none
                    event = Event(LockAction(action), record, ts, actor, reason)
                    out.append(to_message(event, f"{self.epoch}-{revision}-{n}"))
        return out

    # -- reading ------------------------------------------------------------------------------
    async def _after(self, after: Position, limit: int) -> tuple[list[LockUpdateMessage], int, bool]:
        """Events after ``after`` (from at most ``limit`` commits, read at one revision), that
        revision, and whether more commits follow."""
        start = self._events_start
        events_range: dict[str, Any] = {
            "key": b64(start), "range_end": b64(prefix_end(start)), "limit": str(limit),
            "sort_order": "ASCEND", "sort_target": "MOD"}
        if after[0] > 0:
            events_range["min_mod_revision"] = str(after[0])
        reply = await self._call("kv/txn", {"success": [
            {"request_range": events_range}, {"request_range": {"key": b64(self._trimmed_key)}}]},
            idempotent=True)
        got, trimmed = (r["response_range"] for r in reply["responses"])
        trimmed_kvs = trimmed.get("kvs")
        trimmed_to = int(unb64(trimmed_kvs[0]["value"])) if trimmed_kvs else 0
        if trimmed_to and after[0] <= trimmed_to:
            raise EventGap(f"event {self.epoch}-{after[0]}-{after[1]} is older than the retained log")
        kvs = got.get("kvs", [])
        return self._decode(kvs, after), int(reply["header"]["revision"]), bool(got.get("more"))

    async def _newest(self) -> tuple[list[dict[str, Any]], int]:
        """The newest commit's event key (none or one) and the revision it was read at."""
        start = self._events_start
        reply = await self._range(start, prefix_end(start), limit="1", sort_order="DESCEND",
                                  sort_target="MOD")
        return reply.get("kvs", []), int(reply["header"]["revision"])

    async def events_after(self, since: str | None, limit: int = 1000) -> list[LockUpdateMessage]:
        await self._attached()
        if since is None:
            start = self._events_start
            reply = await self._range(start, prefix_end(start), limit=str(limit),
                                      sort_order="DESCEND", sort_target="MOD")
            return self._decode(list(reversed(reply.get("kvs", []))), (0, 0))[-limit:]
        # One commit more than events asked for: the first may be the one ``since`` is in.
        events, _, _ = await self._after(self._position(since), limit + 1)
        return events[:limit]

    async def last_event_id(self) -> str | None:
        await self._attached()
        kvs, _ = await self._newest()
        if not kvs:
            return None
        return self._decode(kvs, (0, 0))[-1].event_id

    async def _trim(self) -> None:
        """Drop the oldest commits' events beyond ``event_log_size`` commits; looked at once a
        tenth of that many events went by here (so an idle sweep asks etcd nothing)."""
        if self._since_trim <= max(1, self.event_log_size // 10):
            return
        self._since_trim = 0
        start = self._events_start
        counted = await self._range(start, prefix_end(start), count_only=True)
        excess = int(counted.get("count", 0)) - self.event_log_size
        if excess <= 0:
            return
        oldest = await self._range(start, prefix_end(start), limit=str(excess), keys_only=True,
                                   sort_order="ASCEND", sort_target="MOD")
        kvs = oldest.get("kvs", [])
        if not kvs:
            return
        newest_gone = revision_text(max(int(kv["mod_revision"]) for kv in kvs))
        # The mark first (only ever raised), then the events: a reader never finds a hole
        # that is not marked.
        await self._call("kv/txn", {
            "compare": [{"key": b64(self._trimmed_key), "target": "VALUE", "result": "LESS",
                         "value": b64(newest_gone)}],
            "success": [{"request_put": {"key": b64(self._trimmed_key), "value": b64(newest_gone)}}]})
        for i in range(0, len(kvs), 100):
            await self._call("kv/txn", {"success": [
                {"request_delete_range": {"key": kv["key"]}} for kv in kvs[i:i + 100]]})

    # -- following ------------------------------------------------------------------------------
    async def tail(self, since: str | None) -> AsyncIterator[LockUpdateMessage]:
        """Every event after ``since``: read the log from there, then watch it. A lost
        connection is retried with backoff, resuming from the last event seen."""
        position: Position | None = None
        delay = 0.1
        start = self._events_start
        while True:
            try:
                await self._attached()
                if position is None:
                    if since is not None:
                        position = self._position(since)
                    else:
                        kvs, revision = await self._newest()
                        position = (revision + 1, -1) if not kvs else (revision, 1 << 30)
                events, revision, more = await self._after(position, PAGE)
                for msg in events:
                    position = self._position(msg.event_id or "")
                    self._saw([msg])
                    yield msg
                if more:
                    continue
                async for result in self.client.watch(start, prefix_end(start), revision + 1,
                                                      idle=self.watch_idle):
                    if delay > 0.1:
                        log.info("event tail: etcd at %s is back; resuming after %s",
                                 self.where, position)
                        delay = 0.1
                    if result.get("compact_revision") or result.get("canceled"):
                        break  # read the log again from ``position``
                    puts = [ev["kv"] for ev in result.get("events", []) if ev.get("type") != "DELETE"]
                    for msg in self._decode(puts, position):
                        position = self._position(msg.event_id or "")
                        self._saw([msg])
                        yield msg
            except (StoreUnavailableError, EtcdUnavailable) as exc:
                if delay == 0.1:
                    log.warning("event tail: etcd at %s unavailable (%s); retrying", self.where,
                                getattr(exc, "message", None) or exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


__all__ = ["EtcdEventLog", "event_json", "revision_text"]
