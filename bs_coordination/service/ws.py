"""``WS /ws``: the initial status, then every lock change, live; ``?since=ID`` resumes.

Protocol (JSON text frames):

- server -> client on connect: ``{"type": "initial_status", "data": {"locks": [...],
  "total_count": N, "timestamp": ..., "last_event_id": ...}}``; with ``?since=ID`` the events
  after ``ID`` follow, then live ones, with no gap and no duplicate. A table of more than
  ``STATUS_PAGE`` (1000) locks comes in pages: ``data`` then also holds ``"page": 1,
  "pages": N``, and ``{"type": "status_page", "of": "initial_status", "data": {"locks": [...],
  "page": 2..N, "pages": N}}`` messages follow, before any event (the same for ``status``);
- each change: ``{"type": "lock_update", "action": ..., "device_name": ..., "lock": {...},
  "timestamp": ..., "event_id": ...}``;
- when the store lost its data (every lock gone, see ``Store.data_lost``):
  ``{"type": "store_data_lost", "message": ..., "timestamp": ...}``, then an ``error`` and the
  connection closes; reconnecting gives the current (emptied) table;
- client -> server: ``{"type": "ping"}`` -> ``{"type": "pong", "timestamp": ...}``;
  ``{"type": "get_status"}`` -> ``{"type": "status", "data": {...}}``; anything else ->
  ``{"type": "error", "message": ...}`` (the connection stays open).

A client that falls more than the queue size behind is sent an ``error`` naming the last
event it was given and is disconnected; it can reconnect with ``?since=<that id>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime, timezone

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from bs_coordination.errors import CoordinationError, InvalidRequestError
from bs_coordination.models import LocksStatusResponse
from bs_coordination.stores import EventGap, Store
from bs_coordination.stores.base import event_order

from .hub import EventHub, Frame, Subscriber
from .status import locks_status

log = logging.getLogger(__name__)

router = APIRouter(tags=["events"])

#: Largest message a client may send (they are tiny: ping, get_status).
MAX_INCOMING_CHARS = 4096
#: How long a dropped or closing connection may take to flush its last frame.
CLOSE_SECONDS = 2.0
#: Events read from the log per page while replaying ``since``.
REPLAY_PAGE = 1000
#: Locks per status message; a larger table goes out in pages (``Connection.send_status``).
#: 1000 locks make about 400 kB, below every client's message limit (websockets: 1 MiB).
STATUS_PAGE = 1000

# Close codes (RFC 6455 / IANA registry).
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


#: ``code`` of the error frame sent when a ``since`` cannot be resumed from (trimmed from the
#: log, or issued by an earlier run of the service): the client may replay from ``since=0``.
RESUME_GAP = "resume_gap"


def _error(message: str, code: str | None = None) -> str:
    frame = {"type": "error", "message": message}
    if code:
        frame["code"] = code
    return json.dumps(frame)


class Connection:
    """One WebSocket client: a single writer, a reader, and the hub subscription."""

    def __init__(self, ws: WebSocket, store: Store, hub: EventHub) -> None:
        self.ws = ws
        self.store = store
        self.hub = hub
        self.sub: Subscriber = hub.subscribe()
        self._send_lock = asyncio.Lock()
        #: Order of the newest event this connection has sent (or that the snapshot covers).
        self.cursor: tuple[int, ...] = (0,)
        self.last_sent: str | None = None

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def status_data(self) -> LocksStatusResponse:
        return await locks_status(self.store)

    async def send_status(self, kind: str, status: LocksStatusResponse) -> None:
        """Send a status (``initial_status`` or ``status``). A table of more than
        ``STATUS_PAGE`` locks goes out in pages: the first message holds the first page and
        ``"page": 1, "pages": N``, then ``status_page`` messages (``"of": kind``) hold the rest,
        so no message grows with the table. Serialised a page at a time, letting other work
        of the service run between pages."""
        locks = status.locks
        pages = max(1, -(-len(locks) // STATUS_PAGE))
        head = status.model_dump(mode="json", exclude={"locks"})
        first = [lk.model_dump(mode="json") for lk in locks[:STATUS_PAGE]]
        if pages == 1:
            await self.send(json.dumps({"type": kind, "data": {"locks": first, **head}}))
            return
        await self.send(json.dumps({"type": kind, "data": {
            "locks": first, **head, "page": 1, "pages": pages}}))
        for page in range(2, pages + 1):
            await asyncio.sleep(0)
            chunk = locks[(page - 1) * STATUS_PAGE:page * STATUS_PAGE]
            await self.send(json.dumps({"type": "status_page", "of": kind, "data": {
                "locks": [lk.model_dump(mode="json") for lk in chunk],
                "page": page, "pages": pages}}))

    async def open(self, since: str | None) -> bool:
        """Send the initial status and replay ``since``; False if the connection must end."""
        try:
            status = await self.status_data()
        except CoordinationError as exc:
            await self.send(_error(f"status unavailable: {exc.message}"))
            await self.ws.close(TRY_AGAIN_LATER)
            return False
        snapshot_id = status.last_event_id
        await self.send_status("initial_status", status)
        if since is None:
            if snapshot_id:
                self.cursor = event_order(snapshot_id)
                self.last_sent = snapshot_id
            return True
        wanted = event_order(since)
        if any(wanted) and (snapshot_id is None or wanted > event_order(snapshot_id)):
            # An id this log never issued (e.g. a memory store that restarted): following it
            # would skip every event up to it, so continue from the snapshot instead.
            await self.send(_error(
                f"since: event {since[:40]!r} is unknown here (newest is {snapshot_id!r}; did the "
                "service restart?); initial_status holds the current state", RESUME_GAP))
            if snapshot_id:
                self.cursor = event_order(snapshot_id)
                self.last_sent = snapshot_id
            return True
        self.cursor = event_order(since)
        self.last_sent = since
        try:
            while True:
                batch = await self.store.events_after(self.last_sent, limit=REPLAY_PAGE)
                for msg in batch:
                    await self._send_frame(Frame.of(msg))
                if len(batch) < REPLAY_PAGE:
                    return True
        except EventGap as exc:
            # initial_status already gave the current state: continue live from it.
            await self.send(_error(f"since: {exc}; initial_status holds the current state", RESUME_GAP))
            if snapshot_id:
                self.cursor = max(self.cursor, event_order(snapshot_id))
                self.last_sent = snapshot_id
            return True
        except CoordinationError as exc:
            await self.send(_error(exc.message))
            bad_input = isinstance(exc, InvalidRequestError)
            await self.ws.close(POLICY_VIOLATION if bad_input else TRY_AGAIN_LATER)
            return False

    async def _send_frame(self, frame: Frame) -> None:
        if frame.order <= self.cursor:
            return  # already sent, or covered by the snapshot
        await self.send(frame.text)
        self.cursor = frame.order
        self.last_sent = frame.event_id

    async def pump(self) -> None:
        """Forward live events until cancelled."""
        while True:
            frame = await self.sub.queue.get()
            await self._send_frame(frame)

    async def listen(self) -> None:
        """Answer the client's messages until it disconnects."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.send(_error("send JSON text frames, not binary"))
                continue
            if len(text) > MAX_INCOMING_CHARS:
                await self.send(_error(f"message too large (limit {MAX_INCOMING_CHARS} characters)"))
                await self.ws.close(MESSAGE_TOO_BIG)
                return
            await self.answer(text)

    async def answer(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            await self.send(_error("not JSON: send {\"type\": \"ping\"} or {\"type\": \"get_status\"}"))
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "ping":
            await self.send(json.dumps({"type": "pong", "timestamp": _now()}))
        elif kind == "get_status":
            try:
                status = await self.status_data()
            except CoordinationError as exc:
                await self.send(_error(f"status unavailable: {exc.message}"))
                return
            await self.send_status("status", status)
        else:
            shown = kind if isinstance(kind, str) else None
            await self.send(_error(
                f"unknown message type {shown[:40]!r}" if shown is not None
                else "a message is a JSON object with a \"type\": \"ping\" or \"get_status\""))

    async def run(self) -> None:
        pump = asyncio.create_task(self.pump())
        listen = asyncio.create_task(self.listen())
        dropped = asyncio.create_task(self.sub.dropped.wait())
        tasks = {pump, listen, dropped}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        for t in (pump, listen):
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        if self.sub.dropped.is_set():
            await self.close_dropped()

    async def close_dropped(self) -> None:
        since = self.last_sent or "0"
        reason = self.sub.drop_reason
        log.warning("dropping a WebSocket subscriber: %s (last event sent %s)", reason, since)
        # The client may not read at all: never wait on it for long.
        with contextlib.suppress(Exception):
            if self.sub.notice is not None:
                await asyncio.wait_for(self.ws.send_text(self.sub.notice), CLOSE_SECONDS)
            await asyncio.wait_for(
                self.ws.send_text(_error(f"{reason}; reconnect with ?since={since}")),
                CLOSE_SECONDS)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(TRY_AGAIN_LATER), CLOSE_SECONDS)


@router.websocket("/ws")
async def websocket_events(ws: WebSocket) -> None:
    """Live lock changes; see the module docstring for the protocol."""
    store: Store = ws.app.state.store
    hub: EventHub = ws.app.state.hub
    since = ws.query_params.get("since")
    await ws.accept()
    if since is not None:
        try:
            event_order(since)
        except ValueError:
            await ws.send_text(_error(f"since: {since[:40]!r} is not an event id of this service"))
            await ws.close(POLICY_VIOLATION)
            return
    # Subscribe before reading the snapshot, so nothing falls between the two.
    conn = Connection(ws, store, hub)
    try:
        if await conn.open(since):
            await conn.run()
    except WebSocketDisconnect:
        pass
    finally:
        hub.unsubscribe(conn.sub)
        if ws.client_state is WebSocketState.CONNECTED and ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_SECONDS)
