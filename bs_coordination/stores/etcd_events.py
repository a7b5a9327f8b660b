"""The etcd store's event log: events kept in order under ``<prefix>/e/``, read by number, and
followed with an etcd watch (``EtcdEventLog``, a part of ``EtcdStore``; ``etcd`` explains the
layout). An id is ``<epoch>-<number>``; one key holds the events of one commit, named by the
number of its last event (20 digits), so keys sort as the events do.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from bs_coordination.errors import InvalidRequestError, StoreUnavailableError
from bs_coordination.locktable import Event, LockRecord
from bs_coordination.models import LockAction, LockUpdateMessage
from bs_coordination.stores.base import EventGap, to_message
from bs_coordination.stores.etcd_client import EtcdClient, EtcdUnavailable, b64, prefix_end, unb64
from bs_coordination.stores.txn import EVENT_COUNTER, Engine

log = logging.getLogger(__name__)

#: Events read per range while catching up.
PAGE = 10_000


def event_json(n: int, e: Event) -> list[Any]:
    """One event as stored: ``[number, action, record, timestamp, actor]``."""
    return [n, e.action.value, e.record.to_dict(), e.timestamp, e.actor]


class EtcdEventLog:
    """The event log part of ``EtcdStore`` (which provides the attributes declared here)."""

    prefix: str
    epoch: int
    event_log_size: int
    where: str
    client: EtcdClient
    engine: Engine
    _trimmed_to: int
    #: The number of the newest event this replica appended or read.
    _newest: int = 0

    def _saw(self, messages: list[LockUpdateMessage]) -> None:
        """Events appended here or read from the log: tokens raise the floor, and the newest
        number is remembered."""
        for msg in messages:
            self.engine.saw_token(msg.lock.token)
        if messages and messages[-1].event_id:
            self._newest = max(self._newest, int(messages[-1].event_id.split("-")[1]))

    async def _range(self, key: str, range_end: str | None = None, **options: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    async def _attached(self) -> str:
        raise NotImplementedError

    def _key(self, logical: str) -> str:
        raise NotImplementedError

    def _event_key(self, n: int) -> str:
        return f"{self.prefix}e/{n:020d}"

    async def _trim(self) -> None:
        """Drop the oldest events beyond ``event_log_size`` (in steps of a tenth of it), judged
        by the newest event this replica saw (so an idle sweep asks etcd nothing)."""
        below = self._newest - self.event_log_size
        if below > self._trimmed_to + max(1, self.event_log_size // 10):
            start = f"{self.prefix}e/"
            await self._call("kv/deleterange", {"key": b64(start), "range_end": b64(self._event_key(below))})
            self._trimmed_to = below

    async def _last_seq(self) -> int:
        reply = await self._range(self._key(f"c:{EVENT_COUNTER}"))
        kvs = reply.get("kvs")
        return int(unb64(kvs[0]["value"])) if kvs else 0

    def _seq(self, event_id: str) -> int:
        """The number of ``event_id`` in this table (``0``: before the first); ``EventGap`` for
        another table's id."""
        if event_id in ("0", "0-0"):
            return 0
        try:
            epoch, seq = (int(p) for p in event_id.split("-"))
        except (ValueError, AttributeError):
            raise InvalidRequestError(
                f"since: {str(event_id)[:40]!r} is not an event id of this service", field="since") from None
        if epoch != self.epoch:
            raise EventGap(f"event {event_id} belongs to another lock table")
        return seq

    def _decode(self, kvs: list[dict[str, Any]], after: int) -> list[LockUpdateMessage]:
        out = []
        for kv in kvs:
            for n, action, rec, ts, actor in json.loads(unb64(kv["value"])):
                if n > after:
                    event = Event(LockAction(action), LockRecord.from_dict(rec), ts, actor)
                    out.append(to_message(event, f"{self.epoch}-{n}"))
        return out

    async def _after(self, seq: int, limit: int) -> tuple[list[LockUpdateMessage], int]:
        """Events numbered above ``seq`` (at most ``limit``) and the revision they were read at."""
        start = f"{self.prefix}e/"
        reply = await self._range(self._event_key(seq + 1), prefix_end(start), limit=str(limit))
        kvs = reply.get("kvs", [])
        events = self._decode(kvs, seq)[:limit]
        if kvs:
            first = int(json.loads(unb64(kvs[0]["value"]))[0][0])
            if first > seq + 1:
                raise EventGap(f"event {self.epoch}-{seq} is older than the retained log")
        elif seq < self._trimmed_to:
            raise EventGap(f"event {self.epoch}-{seq} is older than the retained log")
        return events, int(reply["header"]["revision"])

    async def events_after(self, since: str | None, limit: int = 1000) -> list[LockUpdateMessage]:
        await self._attached()
        if since is None:
            start = f"{self.prefix}e/"
            reply = await self._range(start, prefix_end(start), limit=str(limit),
                                      sort_order="DESCEND", sort_target="KEY")
            kvs = list(reversed(reply.get("kvs", [])))
            return self._decode(kvs, 0)[-limit:]
        seq = self._seq(since)
        events, _ = await self._after(seq, limit)
        return events

    async def last_event_id(self) -> str | None:
        await self._attached()
        last = await self._last_seq()
        return f"{self.epoch}-{last}" if last else None

    async def tail(self, since: str | None) -> AsyncIterator[LockUpdateMessage]:
        """Every event after ``since``: read the log from there, then watch it. A lost
        connection is retried with backoff, resuming from the last event seen."""
        last: int | None = None
        delay = 0.1
        start = f"{self.prefix}e/"
        while True:
            try:
                await self._attached()
                if last is None:
                    last = self._seq(since) if since is not None else await self._last_seq()
                events, revision = await self._after(last, PAGE)
                for msg in events:
                    last = int(msg.event_id.split("-")[1])  # type: ignore[union-attr]
                    self._saw([msg])
                    yield msg
                if len(events) == PAGE:
                    continue
                async for result in self.client.watch(start, prefix_end(start), revision + 1):
                    if delay > 0.1:
                        log.info("event tail: etcd at %s is back; resuming after %s-%s",
                                 self.where, self.epoch, last)
                        delay = 0.1
                    if result.get("compact_revision") or result.get("canceled"):
                        break  # read the log again from ``last``
                    for ev in result.get("events", []):
                        if ev.get("type") == "DELETE":
                            continue
                        for msg in self._decode([ev["kv"]], last):
                            last = int(msg.event_id.split("-")[1])  # type: ignore[union-attr]
                            self._saw([msg])
                            yield msg
            except (StoreUnavailableError, EtcdUnavailable) as exc:
                if delay == 0.1:
                    log.warning("event tail: etcd at %s unavailable (%s); retrying", self.where,
                                getattr(exc, "message", None) or exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


__all__ = ["EtcdEventLog", "event_json"]
