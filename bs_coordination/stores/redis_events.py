"""The Redis store's event log: a Redis Stream, read back, resumed and followed.

Events are appended by the store's commit (``XADD ... MAXLEN ~``, in the same script call as
the change); the entry id is the event id, so every replica sees one order. This module only
reads: ``events_after`` (``XRANGE``, with the trimmed-log check), ``last_event_id`` and
``tail`` (``XREAD BLOCK`` on a client of its own, made with ``socket_timeout=None``: redis-py 8
would otherwise time the blocking read out at 5 s and retry it; TCP keepalive, on by default,
finds a dead peer).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as redis_async
from redis.exceptions import RedisError, ResponseError

from bs_coordination.errors import InvalidRequestError, StoreUnavailableError
from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores.base import EventGap
from bs_coordination.stores.redis_json import parse_event

log = logging.getLogger(__name__)

#: How long one ``XREAD BLOCK`` waits before it is issued again (milliseconds).
TAIL_BLOCK_MS = 2000
#: Events read per ``XREAD``.
TAIL_BATCH = 500
#: Events this process appended that are kept to spare the tail parsing them again.
OWN_EVENTS_KEPT = 2000
_EVENT_ID = re.compile(r"^[0-9]{1,19}(-[0-9]{1,19})?$")


class RedisEventLog:
    """Reads the stream ``stream`` through ``client``; ``tail_client()`` opens the tail's own
    client and ``close_client`` closes it; ``down`` turns a Redis error into the store's
    ``StoreUnavailableError``."""

    def __init__(self, client: Any, stream: str,
                 tail_client: Callable[[], redis_async.Redis],
                 close_client: Callable[[redis_async.Redis], Awaitable[None]],
                 where: str, down: Callable[[BaseException], StoreUnavailableError]) -> None:
        self._redis = client
        self.stream = stream
        self._tail_client = tail_client
        self._close_client = close_client
        self._where = where
        self._down = down
        #: Raised by the store when its connections were dropped: the tail drops its own.
        self.reconnects = 0
        # Events this process appended, oldest first (so in the log's order).
        self._own: deque[LockUpdateMessage] = deque(maxlen=OWN_EVENTS_KEPT)

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None

    def appended(self, messages: list[LockUpdateMessage]) -> None:
        """Remember events this process appended: the tail reads them back without parsing."""
        self._own.extend(messages)

    def _own_message(self, event_id: str) -> LockUpdateMessage | None:
        """The event ``event_id`` if this process appended it and it is the oldest of those
        kept (the tail reads the log in order, so it usually is); forgets older ones (the
        tail started after them, or they were trimmed)."""
        own = self._own
        if own and own[0].event_id != event_id:
            after = _order(event_id)
            while own and _order(own[0].event_id or "0") < after:
                own.popleft()
        if own and own[0].event_id == event_id:
            return own.popleft()
        return None

    async def events_after(self, since: str | None, limit: int = 1000) -> list[LockUpdateMessage]:
        with self._unavailable():
            if since is None:
                entries = list(reversed(await self._redis.xrevrange(self.stream, count=limit)))
            else:
                after = check_id(since)
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.xinfo_stream(self.stream)
                    pipe.xrange(self.stream, min=f"({after}", count=limit)
                    info, entries = await pipe.execute(raise_on_error=False)
                if isinstance(entries, ResponseError):
                    raise InvalidRequestError(
                        f"since: {since[:40]!r} is not an event id of this service",
                        field="since")
                if isinstance(info, dict):
                    # Trimming removes the oldest entries: if any were removed, everything
                    # before the first retained entry may be gone (ids are not contiguous, so
                    # the one just before it is unknown and a client exactly there resyncs).
                    first = info.get("first-entry")
                    trimmed = int(info.get("entries-added") or 0) > int(info.get("length") or 0)
                    if trimmed and first and _order(after) < _order(first[0]):
                        raise EventGap(f"event {since} is older than the retained log")
                else:
                    entries = []  # no stream yet
        return [parse_event(i, f) for i, f in entries]

    async def last_event_id(self) -> str | None:
        with self._unavailable():
            last = await self._redis.xrevrange(self.stream, count=1)
        return last[0][0] if last else None

    async def tail(self, since: str | None) -> AsyncIterator[LockUpdateMessage]:
        """Every event after ``since`` (after the newest when ``None``), forever. A lost
        connection is retried with backoff, resuming from the last id seen."""
        last = check_id(since) if since is not None else None
        # A client of its own: ``XREAD BLOCK`` holds its connection.
        client = self._tail_client()
        delay = 0.1
        seen_reconnects = self.reconnects
        try:
            while True:
                if seen_reconnects != self.reconnects:
                    seen_reconnects = self.reconnects
                    await client.connection_pool.disconnect()
                try:
                    if last is None:
                        last = await self.last_event_id() or "0-0"
                    reply: Any = await client.xread({self.stream: last}, count=TAIL_BATCH,
                                               block=TAIL_BLOCK_MS)
                except (RedisError, OSError, StoreUnavailableError) as exc:
                    if delay == 0.1:  # once per outage, not every retry
                        log.warning("event tail: Redis at %s unavailable (%s); retrying",
                                    self._where, type(exc).__name__)
                    await client.connection_pool.disconnect()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if delay > 0.1:
                    log.info("event tail: Redis at %s is back; resuming after %s",
                             self._where, last)
                    delay = 0.1
                for _stream, entries in reply or []:
                    for event_id, fields in entries:
                        last = event_id
                        msg = self._own_message(event_id)
                        if msg is None:
                            msg = parse_event(event_id, fields)
                        yield msg
        finally:
            await self._close_client(client)


def check_id(event_id: str) -> str:
    """``event_id`` if it is a stream id (``ms`` or ``ms-seq``), else ``InvalidRequestError``."""
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id) or any(
            int(p) >= 2**64 for p in event_id.split("-")):
        raise InvalidRequestError(
            f"since: {str(event_id)[:40]!r} is not an event id of this service", field="since")
    return event_id


def _order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return (int(ms), int(seq or 0))
