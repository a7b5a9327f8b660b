"""One Redis connection shared by every operation of a Redis store, used as a pipeline.

Calls are written in the order they are made; every call made during one event-loop iteration
goes out in one write (one ``send`` for 50 concurrent requests instead of 50), and replies are
matched to calls in order, which is the order Redis ran them. Each call may pass ``on_reply``,
run by the reader as its reply arrives, in that same order and even if the caller has gone:
the store updates its cache there, so the cache never goes back in time.

Failing closed: if no reply arrives within ``timeout`` of a call, or the connection breaks, every
call waiting on it fails (its outcome is unknown to the caller) and the connection is dropped;
the next call opens a new one, so the store heals by itself when Redis returns. The reader
reads all the time, so a connection Redis closed while idle is noticed at once instead of
failing the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

OnReply = Callable[[Any], None]


class _Link:
    """One open connection with its writer and reader tasks; dead for good once it fails."""

    def __init__(self, conn: Any, pool: Any, timeout: float) -> None:
        self.conn = conn
        self.pool = pool
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.pending: deque[tuple[asyncio.Future[Any], OnReply | None, float]] = deque()
        self.outbox: list[bytes] = []
        self.dead: BaseException | None = None
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._writer = asyncio.create_task(self._write_loop(), name="bs-coordination-redis-writer")
        self._reader = asyncio.create_task(self._read_loop(), name="bs-coordination-redis-reader")

    def call(self, packed: bytes, on_reply: OnReply | None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append((fut, on_reply, self.loop.time() + self.timeout))
        self.outbox.append(packed)
        self._wake.set()
        if self._timer is None:
            self._arm()
        return fut

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self.outbox = self.outbox, []
                if batch:
                    await self.conn.send_packed_command(batch, check_health=False)
        except Exception as exc:
            self.die(exc)

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    reply = await self.conn.read_response(timeout=math.inf)
                except ResponseError as exc:
                    reply = exc  # an error reply answers its call
                if not self.pending:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                fut, on_reply, _ = self.pending.popleft()
                if on_reply is not None:
                    try:
                        on_reply(reply)
                    except Exception:  # a bug there must not stop the replies of others
                        log.exception("handling a Redis reply failed")
                if not fut.done():
                    fut.set_result(reply)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.die(exc)
        finally:
            self.die(RedisConnectionError("connection closed"))
            with contextlib.suppress(Exception):
                await self.conn.disconnect(nowait=True)
            with contextlib.suppress(Exception):
                await self.pool.release(self.conn)

    def _arm(self) -> None:
        self._timer = self.loop.call_at(self.pending[0][2], self._check)

    def _check(self) -> None:
        self._timer = None
        if not self.pending or self.dead is not None:
            return
        if self.pending[0][2] <= self.loop.time():
            self.die(RedisTimeoutError(f"no reply from Redis within {self.timeout:g} s"))
        else:
            self._arm()

    def die(self, exc: BaseException) -> None:
        """Fail every waiting call with ``exc`` and stop (the reader closes the connection)."""
        if self.dead is not None:
            return
        self.dead = exc
        while self.pending:
            fut, _, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        self.outbox.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        me = asyncio.current_task()
        for task in (self._writer, self._reader):
            if task is not me:
                task.cancel()

    async def close(self) -> None:
        self.die(RedisConnectionError("the store is closed"))
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


class OrderedConnection:
    """Calls on one pipelined connection (see the module docstring), opened on first use."""

    def __init__(self, pool: Any, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._link: _Link | None = None
        self._opening = asyncio.Lock()

    async def call(self, packed: bytes, on_reply: OnReply | None = None) -> Any:
        """Send ``packed`` (one command); its reply, an error reply as an exception value.
        Raises ``redis.exceptions.ConnectionError``/``TimeoutError`` when the connection fails
        (whether the command ran is then unknown)."""
        link = self._link
        if link is None or link.dead is not None:
            link = await self._open()
        return await link.call(packed, on_reply)

    async def _open(self) -> _Link:
        async with self._opening:
            link = self._link
            if link is None or link.dead is not None:
                conn = await self._pool.get_connection()
                link = self._link = _Link(conn, self._pool, self._timeout)
            return link

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()
            self._link = None
        await self._pool.disconnect()
