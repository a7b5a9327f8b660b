"""One Redis connection used as a pipeline: every lock operation of a Redis store shares one
(the event tail has one of its own).

Calls are written in the order they are made; every call made during one event-loop iteration
goes out in one write (one ``send`` for many concurrent requests instead of one each), and
replies are matched to calls in order, which is the order Redis ran them. Each call may pass
``on_reply``, run as its reply arrives, in that same order and even if the caller has gone: the
store updates its cache there, so the cache never goes back in time.

``_Link`` is a plain ``asyncio.Protocol``: a call is a ``write`` (coalesced per loop iteration
with ``call_soon``), replies are parsed with ``hiredis`` as the bytes arrive (``data_received``)
and resolve the calls' futures in order. No reader or writer task, no stream, no per-reply
redis-py machinery: this link carries every lock operation, so its cost is paid on each one.
The URL is read by redis-py (the store's other clients read the same one): every form the
store accepts works, ``redis://``, ``rediss://`` (its TLS settings), ``unix://``; a password
(and user name) is sent with ``AUTH``, a database number with ``SELECT``.

Failing closed: if no reply arrives within ``timeout`` of a call, or the connection breaks, every
call waiting on it fails (its outcome is unknown to the caller) and the connection is dropped;
the next call opens a new one, so the store heals by itself when Redis returns. A connection
Redis closes while idle is noticed at once (``connection_lost``) instead of failing the next
call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
import redis.asyncio as redis_async
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bs_coordination.stores.redis_script import pack

log = logging.getLogger(__name__)

OnReply = Callable[[Any], None]


class _Link(asyncio.Protocol):
    """One open connection; dead for good once it fails."""

    transport: asyncio.Transport

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        # Error replies come back as ``ResponseError`` values (they answer their call).
        self.parser = hiredis.Reader(encoding="utf-8", replyError=ResponseError,
                                     protocolError=InvalidResponse)
        self.pending: deque[tuple[asyncio.Future[Any], OnReply | None, float]] = deque()
        self.outbox: list[bytes] = []
        self.dead: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None

    def call(self, packed: bytes, on_reply: OnReply | None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append((fut, on_reply, self.loop.time() + self.timeout))
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(packed)
        if self._timer is None:
            self._arm()
        return fut

    def _flush(self) -> None:
        """Write every call made since the last write (runs once per loop iteration)."""
        batch, self.outbox = self.outbox, []
        if self.dead is None:
            self.transport.write(b"".join(batch))

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        pending = self.pending
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if not pending:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                fut, on_reply, _ = pending.popleft()
                if on_reply is not None:
                    try:
                        on_reply(reply)
                    except Exception:  # a bug there must not stop the replies of others
                        log.exception("handling a Redis reply failed")
                if not fut.done():
                    fut.set_result(reply)
        except Exception as exc:  # a protocol error: nothing after it can be trusted
            self.die(exc)

    def eof_received(self) -> bool:
        self.die(RedisConnectionError("Redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.die(RedisConnectionError(f"connection lost: {exc}" if exc else "connection closed"))

    # -- failing -----------------------------------------------------------------------
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
        """Fail every waiting call with ``exc`` and drop the connection."""
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
        self.transport.abort()


class OrderedConnection:
    """Calls on one pipelined connection to ``url`` (see the module docstring), opened on first
    use; a reply is awaited at most ``timeout`` seconds, a connection ``connect_timeout``."""

    def __init__(self, url: str, timeout: float, connect_timeout: float) -> None:
        # Never connected: only its connection class and settings are used (``_connect``).
        self._pool = redis_async.ConnectionPool.from_url(
            url, socket_connect_timeout=connect_timeout)
        self._timeout = timeout
        self._link: _Link | None = None
        self._opening = asyncio.Lock()

    def call(self, packed: bytes, on_reply: OnReply | None = None) -> Awaitable[Any]:
        """Send ``packed`` (one command); await its reply, an error reply as an exception
        value. Raises ``redis.exceptions.ConnectionError``/``TimeoutError`` when the connection
        fails (whether the command ran is then unknown)."""
        link = self._link
        if link is None or link.dead is not None:
            return self._open_and_call(packed, on_reply)
        return link.call(packed, on_reply)

    async def _open_and_call(self, packed: bytes, on_reply: OnReply | None) -> Any:
        return await (await self._open()).call(packed, on_reply)

    async def _open(self) -> _Link:
        async with self._opening:
            link = self._link
            if link is None or link.dead is not None:
                link = self._link = await self._connect()
            return link

    async def _connect(self) -> _Link:
        # A connection object of redis-py, never connected: the URL's settings as redis-py
        # reads them (address, TLS context, user name, password, database).
        conf = self._pool.make_connection()
        loop = asyncio.get_running_loop()

        def link() -> _Link:
            return _Link(self._timeout)

        if isinstance(conf, UnixDomainSocketConnection):
            connecting = loop.create_unix_connection(link, conf.path)
        else:
            ssl = conf.ssl_context.get() if isinstance(conf, SSLConnection) else None
            connecting = loop.create_connection(link, conf.host, conf.port, ssl=ssl)
        try:
            _, made = await asyncio.wait_for(connecting, conf.socket_connect_timeout)
        except asyncio.TimeoutError:
            raise RedisTimeoutError("timeout connecting to Redis") from None
        handshake = []
        if conf.password:
            user = [conf.username] if conf.username else []
            handshake.append(made.call(pack([("AUTH", *user, conf.password)]), None))
        if conf.db:
            handshake.append(made.call(pack([("SELECT", conf.db)]), None))
        try:
            for reply in await asyncio.gather(*handshake):
                if isinstance(reply, Exception):
                    raise reply
        except BaseException:
            made.die(RedisConnectionError("handshake failed"))
            raise
        return made

    async def close(self) -> None:
        if self._link is not None:
            self._link.die(RedisConnectionError("the connection is closed"))
            self._link = None
