"""Which locks the running plans of one RunEngine hold, and which of them are preempted.

Fed by the service's answers to lock requests and by its event stream (and, after every
(re)connect, by the full status); no I/O. A preemption, restore or loss changes
``preempted`` and calls ``on_change``; the coordinator tells the suspender. Everything here
runs on the client thread, where answers and events arrive in order.

Our locks are told apart from everyone else's by user and type (``QUEUE_EXECUTING``): one
user cannot hold a device twice at that priority, so a device name then names one lock.
A ``preempted`` event must also carry the token of our grant; a ``restored`` one brings a new
token, which replaces it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bs_coordination.errors import LockConflictError
from bs_coordination.models import DeviceLock, LockState, LockType
from bs_coordination.runengine._client_thread import describe_lock

if TYPE_CHECKING:
    from bs_coordination.client import LeaseKeeper

log = logging.getLogger(__name__)

#: How many preemption events about unknown locks of ours are remembered (see ``_early``).
_EARLY_EVENTS = 256


class PlanLocks:
    """The locks of one plan: one key, the devices held under it, what was refused."""

    _ids = itertools.count(1)

    def __init__(self, *, plan_uid: str | None, reason: str | None, wait: float) -> None:
        self.id = next(self._ids)
        self.plan_uid = plan_uid
        self.reason = reason
        self.wait = wait
        #: Device name -> our lock as last seen (token, state). Client thread only.
        self.held: dict[str, DeviceLock] = {}
        #: Device name -> the error that refused it (later messages fail at once).
        self.refused: dict[str, LockConflictError] = {}
        #: Objects (device or component) whose device is held and active: no check needed.
        self.covered: set[Any] = set()
        #: Device name -> objects in ``covered`` because of it (to uncover on preemption).
        self.cover_refs: dict[str, list[Any]] = {}
        self.closed = False
        self.failed = False  # a request was refused: do not wait again during cleanup
        self._key: str | None = None
        self._keeper: LeaseKeeper | None = None
        self._alock: asyncio.Lock | None = None  # created on the client loop
        self._changed: asyncio.Event | None = None

    def __repr__(self) -> str:  # never show the key
        return f"<PlanLocks #{self.id} devices={sorted(self.held)} closed={self.closed}>"

    @property
    def device_names(self) -> list[str]:
        return sorted(self.held)

    def cover(self, name: str, obj: Any) -> None:
        """RunEngine thread: ``obj`` belongs to held device ``name``; skip it from now on."""
        self.covered.add(obj)
        self.cover_refs.setdefault(name, []).append(obj)

    def uncover(self, name: str) -> None:
        """Client thread: the next message touching ``name`` must ask again."""
        for obj in list(self.cover_refs.get(name, ())):
            self.covered.discard(obj)

    def signal(self) -> None:
        """Client thread: wake whoever waits for a change of this plan's locks."""
        if self._changed is not None:
            self._changed.set()


class LockTracker:
    """The locks of the open plans (``sessions``) and which are preempted (``preempted``)."""

    def __init__(self, user_id: str, on_change: Callable[[], None]) -> None:
        self.user_id = user_id
        self.on_change = on_change
        self.sessions: dict[int, PlanLocks] = {}
        #: Device name -> the open session holding it.
        self.owner: dict[str, PlanLocks] = {}
        #: Device name -> our preempted lock (with ``preempted_by``).
        self.preempted: dict[str, DeviceLock] = {}
        # A preemption may overtake the answer to our own request: kept until the grant is
        # tracked, by (device, token).
        self._early: OrderedDict[tuple[str, int], DeviceLock] = OrderedDict()

    def ours(self, lock: DeviceLock) -> bool:
        return lock.user_id == self.user_id and lock.lock_type is LockType.QUEUE_EXECUTING

    def open(self, session: PlanLocks) -> None:
        self.sessions[session.id] = session

    def track(self, session: PlanLocks, lock: DeviceLock) -> None:
        """``session`` was granted ``lock``."""
        name = lock.device_name
        session.held[name] = lock
        self.owner[name] = session
        early = self._early.pop((name, lock.token), None)
        if early is not None:
            self.on_event(name, early, "preempted")

    def forget(self, session: PlanLocks) -> bool:
        """Stop following ``session``'s locks; True if it was open."""
        registered = self.sessions.pop(session.id, None) is not None
        changed = False
        for name in list(session.held):
            if self.owner.get(name) is session:
                del self.owner[name]
            if self.preempted.pop(name, None) is not None:
                changed = True
        session.signal()
        if changed:
            self.on_change()
        return registered

    def on_event(self, device_name: str, lock: DeviceLock, action: str) -> None:
        """One ``lock_update`` event of the stream."""
        if not self.ours(lock):
            return
        name = lock.device_name
        session = self.owner.get(name)
        mine = session.held.get(name) if session is not None else None
        if session is None or mine is None:
            if action == "preempted":
                self._early[(name, lock.token)] = lock
                while len(self._early) > _EARLY_EVENTS:
                    self._early.popitem(last=False)
            return
        if action == "preempted" and lock.token == mine.token:
            session.held[name] = lock
            session.uncover(name)
            self.preempted[name] = lock
            by = lock.preempted_by
            log.warning("the plan's lock on %r is preempted: %s", name,
                        describe_lock(by) if by is not None else "by a higher priority")
            self.on_change()
        elif action == "restored" and mine.state is LockState.PREEMPTED:
            session.held[name] = lock
            if self.preempted.pop(name, None) is not None:
                log.info("lock on %r restored", name)
                self.on_change()
        elif action in ("expired", "force_released", "released") and lock.token == mine.token:
            self._lose(session, name, action)
        elif action in ("renewed", "upgraded") and lock.token == mine.token:
            session.held[name] = lock
        session.signal()

    def _lose(self, session: PlanLocks, name: str, why: str) -> None:
        session.held.pop(name, None)
        session.uncover(name)
        if self.owner.get(name) is session:
            del self.owner[name]
        if not session.closed:
            log.warning("the running plan lost its lock on %r (%s); it is requested again "
                        "before the next message that touches the device", name, why)
        if self.preempted.pop(name, None) is not None:
            self.on_change()

    def on_status(self, locks: list[DeviceLock]) -> None:
        """(Re)connected: resynchronise the plan's locks from the full status."""
        ours = {(lk.device_name): lk for lk in locks if self.ours(lk)}
        changed = False
        for session in list(self.sessions.values()):
            for name, mine in list(session.held.items()):
                now = ours.get(name)
                if now is None or (now.plan_uid != mine.plan_uid):
                    self._lose(session, name, "gone after reconnect")
                    continue
                session.held[name] = now
                if now.state is LockState.PREEMPTED:
                    session.uncover(name)
                    if name not in self.preempted:
                        changed = True
                    self.preempted[name] = now
                elif self.preempted.pop(name, None) is not None:
                    changed = True
            session.signal()
        if changed:
            self.on_change()


__all__ = ["LockTracker", "PlanLocks"]
