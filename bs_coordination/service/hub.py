"""The event hub: one task follows the store's event log and fans events out to subscribers.

The log (memory ring buffer or Redis Stream) is the single source, so a subscriber of this
replica also sees changes made through other replicas. Each subscriber has a bounded queue;
a subscriber that falls behind is marked dropped (and its connection closed by its handler)
instead of slowing the hub or anyone else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from bs_coordination.models import LockUpdateMessage
from bs_coordination.stores import EventGap, Store
from bs_coordination.stores.base import event_order

from .tasks import stop

log = logging.getLogger(__name__)

#: Back-off after the store's tail fails (e.g. Redis down): first, then doubling up to max.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Frame:
    """An event as it goes out: its order, its id, and its JSON text (serialised once)."""

    order: tuple[int, ...]
    event_id: str
    text: str

    @classmethod
    def of(cls, msg: LockUpdateMessage) -> Frame:
        event_id = msg.event_id or "0"
        return cls(event_order(event_id), event_id, msg.model_dump_json())


@dataclass(eq=False)
class Subscriber:
    """One listener: a bounded queue of frames and the reason it was dropped, if it was."""

    queue: asyncio.Queue[Frame]
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    drop_reason: str = ""
    #: A frame to send before the drop's error (``EventHub.store_lost``).
    notice: str | None = None

    def drop(self, reason: str, notice: str | None = None) -> None:
        if not self.dropped.is_set():
            self.drop_reason = reason
            self.notice = notice
            self.dropped.set()


class EventHub:
    """Fans the store's events out to subscribers; see the module docstring."""

    def __init__(self, queue_size: int = 1000) -> None:
        self.queue_size = queue_size
        self._subs: set[Subscriber] = set()
        self._listeners: list[Callable[[LockUpdateMessage], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._store: Store | None = None
        #: Id of the newest event handed to subscribers.
        self.last_event_id: str | None = None

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def start(self, store: Store) -> None:
        self._store = store
        self._task = asyncio.create_task(self._run(store), name="bs-coordination-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            await stop(self._task)
            self._task = None
        for sub in list(self._subs):
            sub.drop("the service is shutting down")
        self._subs.clear()

    def subscribe(self) -> Subscriber:
        sub = Subscriber(asyncio.Queue(self.queue_size))
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    def store_lost(self, message: str) -> None:
        """The store lost its data: tell every subscriber with a ``store_data_lost`` frame,
        then disconnect it, so it reconnects and resynchronises from the (now empty) table.
        A store listener (``Store.add_data_loss_listener``)."""
        notice = json.dumps({"type": "store_data_lost", "message": message,
                             "timestamp": datetime.now(timezone.utc).isoformat()})
        for sub in list(self._subs):
            sub.drop("the lock store lost its data", notice)

    def add_listener(self, listener: Callable[[LockUpdateMessage], None]) -> None:
        """Call ``listener(event)`` for every event, in the hub's task (it must not block).
        Unlike a subscriber it has no queue and is never dropped (the metrics count this way)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[LockUpdateMessage], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def publish(self, msg: LockUpdateMessage) -> None:
        """Hand one event to every listener and subscriber without ever waiting."""
        self.last_event_id = msg.event_id or "0"
        for listener in self._listeners:
            try:
                listener(msg)
            except Exception:
                log.exception("event listener %r failed", listener)
        if not self._subs:
            return
        frame = Frame.of(msg)  # serialised once, for every subscriber
        for sub in self._subs:
            if sub.dropped.is_set():
                continue
            try:
                sub.queue.put_nowait(frame)
            except asyncio.QueueFull:
                sub.drop("too slow: more than "
                         f"{self.queue_size} events undelivered")

    async def _run(self, store: Store) -> None:
        last: str | None = None
        started = False
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                if not started:
                    # Start at the log's end; "0" for an empty log so nothing is skipped.
                    last = await store.last_event_id() or "0"
                    started = True
                async for msg in store.tail(last):
                    last = msg.event_id or last
                    delay = RETRY_FIRST_SECONDS
                    # Wake waiting requests here too: the change may come from another replica.
                    store.notify_changed()
                    self.publish(msg)
                    # One request can append hundreds of events at once: let the connections
                    # forward each one before the next, so a burst alone never fills a queue.
                    if self._subs:
                        await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except EventGap as exc:
                log.error("event log was trimmed past event %s (%s): subscribers must resync",
                          last, exc)
                for sub in list(self._subs):
                    sub.drop("events were lost from the log; reconnect to resynchronise")
                started = False
            except Exception:
                log.warning("following the event log failed; retrying from event %s in %.1f s",
                            last, delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            else:
                await asyncio.sleep(delay)  # a tail should never end; do not spin if it does
