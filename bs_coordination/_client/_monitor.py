"""WebSocket monitoring: a local cache of the active locks, callbacks, automatic reconnect.

One task reads the socket and keeps the cache; another runs the callbacks in event order, so a
slow callback never makes the service drop this subscriber and never reorders events. After a
lost connection the reader reconnects with exponential backoff and ``?since=<last event id>``:
the service replays what was missed (delivered to the callbacks, each event once) and sends a
fresh ``initial_status`` that replaces the cache and is handed to the status callbacks, so a
consumer can resynchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import aiohttp
from yarl import URL

from bs_coordination._client import _cache
from bs_coordination._client._http import NO_ANSWER, HttpTransport
from bs_coordination.errors import ServiceError
from bs_coordination.models import DeviceLock

log = logging.getLogger(__name__)

#: ``cb(device_name, lock, action)``; may return an awaitable.
LockCallback = Callable[[str, DeviceLock, str], Any]
#: ``cb(locks)`` with every lock (active and preempted) of an ``initial_status``.
StatusCallback = Callable[[list[DeviceLock]], Any]
#: ``cb(message)`` with each ``initial_status`` and ``lock_update`` message, as the service sent it.
MessageCallback = Callable[[dict[str, Any]], Any]


async def call_safely(cb: Callable[..., Any], *args: Any) -> None:
    """Run a sync or async callback; log (never raise) what it raises."""
    try:
        result = cb(*args)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("lock monitoring callback %r failed", cb)


class LockMonitor:
    """Follows ``/ws`` of the service; see the module docstring."""

    def __init__(
        self,
        transport: HttpTransport,
        ws_url: str,
        *,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 10.0,
        heartbeat: float | None = 20.0,
    ) -> None:
        self.transport = transport
        self.ws_url = ws_url
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.heartbeat = heartbeat
        self.lock_callbacks: list[LockCallback] = []
        self.status_callbacks: list[StatusCallback] = []
        self.message_callbacks: list[MessageCallback] = []
        #: Active locks by device name.
        self.cache: dict[str, DeviceLock] = {}
        #: Id of the newest event handed to the callbacks (resume point).
        self.last_event_id: str | None = None
        #: How many times the connection was re-established after a loss.
        self.reconnects = 0
        self._snapshot_event_id: str | None = None
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._stopping = False
        self._got_status = False  # the current connection delivered its initial_status
        self._resync_now = False  # reconnect at once, from the start of the log
        # An initial_status arriving in pages: (the status so far, its first message).
        self._paged: tuple[dict[str, Any], dict[str, Any]] | None = None

    @property
    def running(self) -> bool:
        return self._reader is not None and not self._reader.done()

    @property
    def connected(self) -> bool:
        """Connected, and this connection's initial status has arrived (every page of it):
        the events read from now on are the ones after that status."""
        return self._ws is not None and not self._ws.closed and self._got_status

    async def start(self, timeout: float) -> None:
        """Connect and return once the first ``initial_status`` has been applied."""
        if self.running:
            return
        self._stopping = False
        self._queue = asyncio.Queue()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._dispatcher = asyncio.create_task(self._dispatch(self._queue),
                                               name="bs-coordination-callbacks")
        self._reader = asyncio.create_task(self._run(ready), name="bs-coordination-websocket")
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise ServiceError(
                f"WebSocket {self.ws_url}: no initial_status within {timeout:g} s",
                status_code=NO_ANSWER) from None
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the socket and end both tasks (pending callbacks are dropped)."""
        self._stopping = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        # A callback may stop monitoring: its own task (the dispatcher) is not cancelled but
        # ends after the callback returns, because its queue is no longer the current one.
        me = asyncio.current_task()
        self._queue = asyncio.Queue()
        tasks = [t for t in (self._reader, self._dispatcher) if t is not None and t is not me]
        for task in tasks:
            task.cancel()
        if tasks:
            # ``wait`` (not ``await task``) so a cancellation of the caller is not swallowed.
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.debug("monitoring task ended with %r", task.exception())
        self._reader = self._dispatcher = None
        self._ws = None

    def _url(self) -> str:
        if self.last_event_id is None:
            return self.ws_url
        return str(URL(self.ws_url).update_query(since=self.last_event_id))

    async def _run(self, ready: asyncio.Future[None]) -> None:
        delay = self.reconnect_delay
        first = True
        seen_status = False  # an initial_status arrived (``ready`` resolves after its callbacks)
        while not self._stopping:
            url = self._url()
            try:
                ws = await self.transport.open().ws_connect(url, heartbeat=self.heartbeat)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                if not seen_status:
                    # A refused handshake (e.g. 401/403 with authentication on) keeps its status.
                    status = getattr(exc, "status", NO_ANSWER)
                    why = (f"the service refused it (HTTP {status})"
                           if isinstance(exc, aiohttp.WSServerHandshakeError) else str(exc))
                    ready.set_exception(ServiceError(
                        f"cannot open WebSocket {self.ws_url}: {why}", status_code=status))
                    return
                log.warning("WebSocket %s: reconnect failed (%s); retrying in %.1f s",
                            self.ws_url, exc, delay)
            else:
                if not first:
                    self.reconnects += 1
                    log.info("WebSocket %s: reconnected (resuming after event %s)",
                             self.ws_url, self.last_event_id)
                first = False
                self._ws = ws
                self._got_status = False
                self._paged = None
                try:
                    await self._read(ws, ready)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    log.warning("WebSocket %s: connection lost (%s)", self.ws_url, exc)
                finally:
                    self._ws = None
                    with contextlib.suppress(Exception):
                        await ws.close()
                seen_status = seen_status or self._got_status
                if not seen_status:
                    ready.set_exception(ServiceError(
                        f"WebSocket {self.ws_url} closed before its initial_status "
                        f"(close code {ws.close_code})", status_code=NO_ANSWER))
                    return
                if self._got_status:
                    delay = self.reconnect_delay
                if not self._stopping and not self._resync_now:
                    log.warning("WebSocket %s: disconnected (close code %s); reconnecting in "
                                "%.1f s", self.ws_url, ws.close_code, delay)
            if self._stopping:
                return
            if self._resync_now:
                self._resync_now = False
                continue
            await asyncio.sleep(delay * (1 + 0.2 * random.random()))
            delay = min(delay * 2, self.max_reconnect_delay)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse[bool], ready: asyncio.Future[None]) -> None:
        """Handle messages until the socket closes."""
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    log.warning("WebSocket %s: ignoring a message that is not JSON", self.ws_url)
                    continue
                if not isinstance(data, dict):
                    continue
                try:
                    self._handle(data, ready)
                except (ValueError, TypeError, KeyError) as exc:
                    log.warning("WebSocket %s: ignoring a malformed %r message (%s)",
                                self.ws_url, data.get("type"), exc)
                if self._resync_now:
                    return
            elif msg.type == aiohttp.WSMsgType.ERROR:
                log.warning("WebSocket %s: %s", self.ws_url, ws.exception())
                break

    def _handle(self, data: dict[str, Any], ready: asyncio.Future[None]) -> None:
        kind = data.get("type")
        if kind == "lock_update":
            self._on_event(data)
        elif kind == "initial_status":
            status = data.get("data") or {}
            if int(status.get("pages") or 1) > 1:  # a large table: the rest follows in pages
                self._paged = (dict(status, locks=list(status.get("locks") or [])), data)
                return
            self._paged = None
            self._on_initial_status(status, ready, data)
            self._got_status = True
        elif kind == "status_page":
            if data.get("of") != "initial_status" or self._paged is None:
                return  # a page of a get_status reply: this client never asks for one
            status, first = self._paged
            page = data.get("data") or {}
            status["locks"].extend(page.get("locks") or [])
            if int(page.get("page") or 0) >= int(page.get("pages") or 0):
                self._paged = None
                self._on_initial_status(status, ready, first)
                self._got_status = True
        elif kind in ("pong", "ping"):
            pass
        elif kind == "store_data_lost":
            # Every lock is gone: no cached lock can be trusted. The service disconnects us
            # next; the reconnect's initial_status gives the current table.
            log.error("WebSocket %s: %s", self.ws_url, data.get("message"))
            self.cache.clear()
            self._queue.put_nowait(("message", data))
        elif kind in ("error", "warning", "disconnect", "dropped", "lagging"):
            log.warning("WebSocket %s: service says: %s", self.ws_url,
                        data.get("message") or data.get("detail") or data)
            if data.get("code") == "resume_gap" and self.last_event_id not in (None, "0"):
                # Our resume point is unknown to the service (it restarted without persistence,
                # or trimmed its log): replay what its log holds, from its start, once.
                log.warning("WebSocket %s: the service's event log restarted or was trimmed; "
                            "resynchronising from its start", self.ws_url)
                self.last_event_id = "0"
                self._resync_now = True
        else:
            log.debug("WebSocket %s: ignoring message type %r", self.ws_url, kind)

    def _on_initial_status(self, status: dict[str, Any], ready: asyncio.Future[None],
                           message: dict[str, Any]) -> None:
        locks = [DeviceLock.model_validate(item) for item in status.get("locks", [])]
        snapshot_id = status.get("last_event_id")
        snapshot_id = str(snapshot_id) if snapshot_id is not None else None
        self.cache = _cache.snapshot(locks)
        self._snapshot_event_id = snapshot_id
        if self.last_event_id is not None and _cache.is_before(snapshot_id or "0",
                                                               self.last_event_id):
            # The log went back in time: the service restarted without persistence (memory
            # store). It would skip its new events up to our old id, so start over from the
            # beginning of its new log on a fresh connection.
            log.warning("WebSocket %s: the service's event log restarted (its newest event %s "
                        "is older than %s); resynchronising", self.ws_url, snapshot_id,
                        self.last_event_id)
            self.last_event_id = "0"
            self._resync_now = True
        elif self.last_event_id is None:
            # A first connection: live events follow the snapshot. (On a resume the missed
            # events are replayed after it, so the resume point must not jump ahead.) An empty
            # log resumes from its start, so events during a first outage are not lost either.
            self.last_event_id = str(snapshot_id) if snapshot_id is not None else "0"
        self._queue.put_nowait(("status", locks, ready if not ready.done() else None, message))

    def _on_event(self, data: dict[str, Any]) -> None:
        lock = DeviceLock.model_validate(data["lock"])
        action = str(data["action"])
        device_name = str(data.get("device_name") or lock.device_name)
        event_id = data.get("event_id")
        if event_id is not None:
            event_id = str(event_id)
            if not _cache.is_after(event_id, self.last_event_id):
                return  # already delivered before a reconnect
            self.last_event_id = event_id
        if _cache.is_after(event_id, self._snapshot_event_id):
            _cache.apply_event(self.cache, action, lock)
        self._queue.put_nowait(("event", device_name, lock, action, data))

    async def _dispatch(self, queue: asyncio.Queue[tuple[Any, ...]]) -> None:
        while queue is self._queue:
            item = await queue.get()
            if item[0] == "message":
                for message_cb in list(self.message_callbacks):
                    await call_safely(message_cb, item[1])
            elif item[0] == "event":
                _, device_name, lock, action, message = item
                for lock_cb in list(self.lock_callbacks):
                    await call_safely(lock_cb, device_name, lock, action)
                for message_cb in list(self.message_callbacks):
                    await call_safely(message_cb, message)
            else:
                _, locks, ready, message = item
                for status_cb in list(self.status_callbacks):
                    await call_safely(status_cb, list(locks))
                for message_cb in list(self.message_callbacks):
                    await call_safely(message_cb, message)
                if ready is not None and not ready.done():
                    ready.set_result(None)


__all__ = ["LockCallback", "LockMonitor", "MessageCallback", "StatusCallback", "call_safely"]
