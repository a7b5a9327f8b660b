"""The store protocol: where the lock table lives, and the operations every store offers.

A store implements a handful of primitives (``_transact``, ``_read``, ``_all_records``,
``_due``, ``now``, the event log); ``Store`` builds the public operations on them, so the
waiting logic, key handling and event shaping are written once for every store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol, TypeVar

from bs_coordination import locktable
from bs_coordination.errors import LockConflictError, LockNotFoundError
from bs_coordination.locktable import Event, LockRecord, RecordId, Txn
from bs_coordination.models import (
    DeviceLock,
    LockAction,
    LockRequest,
    LockStatus,
    LockUpdateMessage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a waiting request re-checks when no change notification arrives.
WAIT_POLL_SECONDS = 0.25


class Clock(Protocol):
    """Where a store's time comes from (seconds since the epoch)."""

    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_lock_key() -> str:
    """A fresh secret lock key (192 bits)."""
    return secrets.token_urlsafe(24)


def lock_key_for(idempotency_key: str) -> str:
    """The lock key of a request carrying ``idempotency_key`` (a secret chosen at random by
    the client): derived, so a retry of the request finds its grant (192 bits, as
    ``new_lock_key``). Only its hash is stored, as for every key."""
    digest = hashlib.sha256(b"bs-coordination lock key\0" + idempotency_key.encode()).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()


def event_order(event_id: str) -> tuple[int, ...]:
    """Sort key of an event id of any store (``"<start ms>-<n>"`` in memory, a Redis Stream id in a
    Redis store); ``ValueError`` if it is not an event id."""
    return tuple(int(part) for part in event_id.split("-"))


def to_message(event: Event, event_id: str) -> LockUpdateMessage:
    return LockUpdateMessage(
        action=event.action,
        device_name=event.record.device_name,
        lock=event.record.public(),
        timestamp=datetime.fromtimestamp(event.timestamp, tz=timezone.utc),
        event_id=event_id,
        actor=event.actor,
        reason=event.reason,
    )


@dataclass
class Grant:
    """A successful lock request: the key (only for the acquirer) and its records.

    ``acknowledged``: every holder it displaced that asked for the preemption handshake
    acknowledged in time (or none had to); ``preempted``: the locks it displaced, as they
    stood when the handshake ended."""

    lock_key: str
    records: list[LockRecord]
    acknowledged: bool = True
    preempted: list[DeviceLock] = field(default_factory=list)

    @property
    def locks(self) -> list[DeviceLock]:
        return [r.public() for r in self.records]


class EventGap(Exception):
    """The requested ``since`` is older than the retained log: resynchronise from status."""


class Store(ABC):
    """A lock table with an ordered event log. Subclasses provide the primitives."""

    #: ``memory`` or ``redis``.
    kind: str = "abstract"

    def __init__(self) -> None:
        #: Called with a message when the store finds it lost its data (``data_lost``).
        self._loss_listeners: list[Callable[[str], None]] = []
        #: How many times this store found that it had lost its data.
        self.data_losses = 0
        self._changed = asyncio.Event()
        self._waiting = 0  # requests inside their wait loop (see ``notify_changed``)
        #: Seconds a preemptor waits for displaced holders to acknowledge (the service's
        #: ``--preempt-ack-timeout``).
        self.preempt_ack_timeout = locktable.DEFAULT_PREEMPT_ACK_TIMEOUT

    # -- primitives --------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and load; called once by the service's lifespan."""

    async def close(self) -> None:
        """Release connections; called once by the service's lifespan."""

    @abstractmethod
    async def now(self) -> float:
        """The store's clock."""

    @abstractmethod
    async def _transact(self, op: Callable[[Txn], T], actor: str | None = None) -> tuple[T, list[LockUpdateMessage]]:
        """Run ``op`` on a fresh ``Txn`` and persist its changes and events atomically.

        If ``op`` raises, nothing is written and the error propagates. Returns the op's result
        and the events as appended to the log (with their ids).
        """

    @abstractmethod
    async def _read(self, op: Callable[[Txn], T]) -> T:
        """Run a read-only ``op`` on a consistent view."""

    @abstractmethod
    async def _all_records(self) -> list[LockRecord]:
        """Every stored record (expired ones may be included)."""

    @abstractmethod
    async def _due(self, now: float, limit: int) -> list[RecordId]:
        """Records whose lease ran out at or before ``now`` (from the expiry index)."""

    @abstractmethod
    async def events_after(self, since: str | None, limit: int = 1000) -> list[LockUpdateMessage]:
        """Events after ``since`` (all retained when ``None``); ``EventGap`` if trimmed away."""

    @abstractmethod
    async def last_event_id(self) -> str | None:
        """Id of the newest event, or ``None`` when the log is empty."""

    @abstractmethod
    def tail(self, since: str | None) -> AsyncIterator[LockUpdateMessage]:
        """Every event after ``since`` (or after now when ``None``), forever, in order."""

    def add_data_loss_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(message)`` whenever the store finds that it lost its data (every
        lock and the event log gone: a Redis emptied or restarted without persistence)."""
        self._loss_listeners.append(listener)

    def data_lost(self, message: str) -> None:
        """Report a loss of the store's data: logged at ERROR, counted, told to listeners.
        The store has already raised its fencing counter above every token it handed out."""
        self.data_losses += 1
        log.error("%s", message)
        for listener in self._loss_listeners:
            try:
                listener(message)
            except Exception:
                log.exception("data-loss listener %r failed", listener)

    async def ping(self) -> None:
        """Raise ``StoreUnavailableError`` if the store cannot be used."""

    # -- operations --------------------------------------------------------------------
    def notify_changed(self) -> None:
        """Wake requests waiting for a device (called after every stored change). Nothing to
        do while none waits: a waiting request counts itself in ``_waiting`` before it first
        takes ``_changed``, so no change after that can go unnoticed."""
        if self._waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    async def request(self, req: LockRequest, actor: str | None = None,
                      owner: str | None = None, idempotency_key: str | None = None) -> Grant:
        """Grant ``req`` or raise ``LockConflictError`` (after waiting up to ``req.wait``).

        ``owner`` (authentication on, not an admin): a presented key's locks must be held by
        this principal, else ``LockNotOwnedError``; the same for ``release`` and ``renew``.
        ``idempotency_key``: the request's Idempotency-Key; the lock key is derived from it,
        so the same request sent again gets the same grant while it lasts."""
        presented = req.lock_key is not None
        retry = idempotency_key is not None and not presented
        lock_key = req.lock_key or (lock_key_for(idempotency_key) if idempotency_key is not None
                                    else new_lock_key())
        key_hash = locktable.hash_key(lock_key)
        ack_timeout = self.preempt_ack_timeout

        def grant(txn: Txn, ticket: int | None = None
                  ) -> tuple[list[LockRecord], list[LockRecord]]:
            displaced: list[LockRecord] = []
            records = locktable.request(txn, req, key_hash, presented=presented, ticket=ticket,
                                        owner=owner, ack_timeout=ack_timeout,
                                        displaced=displaced, retry=retry)
            return records, displaced

        try:
            (records, displaced), messages = await self._transact(grant, actor)
        except LockConflictError:
            if req.wait <= 0:
                raise
        else:
            return await self._handshake(Grant(lock_key, records), displaced, messages, actor)
        ticket, _ = await self._transact(
            lambda txn: locktable.enqueue(txn, req.names, req.lock_type.priority, req.wait))
        deadline = time.monotonic() + req.wait
        self._waiting += 1
        try:
            while True:
                changed = self._changed
                try:
                    (records, displaced), messages = await self._transact(
                        lambda txn: grant(txn, ticket), actor)
                    break
                except LockConflictError as exc:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        exc.message = f"{exc.message} (waited {req.wait:g} s)"
                        exc.args = (exc.message,)
                        raise
                try:
                    await asyncio.wait_for(changed.wait(), min(remaining, WAIT_POLL_SECONDS))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiting -= 1
            try:
                await self._transact(lambda txn: locktable.dequeue(txn, ticket))
            except Exception:  # the waiter expires on its own; never mask the real outcome
                log.debug("could not remove wait ticket %s", ticket, exc_info=True)
        return await self._handshake(Grant(lock_key, records), displaced, messages, actor)

    async def _handshake(self, grant: Grant, displaced: list[LockRecord],
                         messages: list[LockUpdateMessage], actor: str | None) -> Grant:
        """Hold the answer to ``grant`` until every holder it displaced that asked for the
        handshake acknowledged, or until the deadline (then their handshakes time out, and
        ``grant.acknowledged`` is False). The holders were told by the grant's ``preempted``
        events. Waits on change notifications, so an acknowledgement made through another
        replica (an event every replica tails) ends the wait as well."""
        if not displaced:
            return grant
        deadline = time.monotonic() + self.preempt_ack_timeout
        timed_out = False
        self._waiting += 1
        try:
            while True:
                changed = self._changed
                state = await self._read(
                    lambda txn: locktable.handshake_outcome(txn, grant.records, displaced))
                if state.lost is not None:
                    raise LockNotFoundError(
                        f"The lock on {state.lost.device_name!r} ended (lease or force release) "
                        "while its preemption handshake ran")
                if not state.pending or timed_out:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    late = [r.device_name for r in state.pending]
                    await self._transact(lambda txn: locktable.time_out_acks(txn, displaced),
                                         actor)
                    log.warning("preemption handshake: no acknowledgement from the holder(s) of "
                                "%s within %g s; granting anyway", ", ".join(map(repr, late)),
                                self.preempt_ack_timeout)
                    timed_out = True
                    continue
                try:
                    await asyncio.wait_for(changed.wait(), min(remaining, WAIT_POLL_SECONDS))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiting -= 1
        acknowledged = state.acknowledged
        gone = [d for d, c in zip(displaced, state.current, strict=True) if c is None]
        if gone and acknowledged:
            acknowledged = await self._released_by_holder(gone, messages)
        grant.acknowledged = acknowledged
        grant.preempted = [(c or d).public() for d, c in zip(displaced, state.current, strict=True)]
        return grant

    async def _released_by_holder(self, gone: list[LockRecord],
                                  messages: list[LockUpdateMessage]) -> bool:
        """Whether every displaced lock that disappeared during a handshake was released (or
        acknowledged) by its holder, rather than expired or force-released: read from the
        event log after the grant (a rare path)."""
        since = next((m.event_id for m in messages if m.event_id), None)
        try:
            events = await self.events_after(since, limit=10_000)
        except EventGap:
            return False
        fine = {LockAction.RELEASED, LockAction.ACKNOWLEDGED}
        confirmed = {(e.device_name, e.lock.token) for e in events if e.action in fine}
        return all((d.device_name, d.token) in confirmed for d in gone)

    async def acknowledge(self, lock_key: str, device_name: str | None = None,
                          actor: str | None = None, owner: str | None = None
                          ) -> list[DeviceLock]:
        """The holder of ``lock_key`` acknowledges the preemption of ``device_name`` (or of
        all its preempted devices): it stopped using them. Returns the locks acknowledged."""
        key_hash = locktable.hash_key(lock_key)
        records, _ = await self._transact(
            lambda txn: locktable.acknowledge(txn, key_hash, device_name, owner), actor)
        return [r.public() for r in records]

    async def release(self, lock_key: str, device_name: str | None = None,
                      actor: str | None = None, owner: str | None = None) -> list[DeviceLock]:
        key_hash = locktable.hash_key(lock_key)
        records, _ = await self._transact(
            lambda txn: locktable.release(txn, key_hash, device_name, owner), actor)
        return [r.public() for r in records]

    async def renew(self, lock_key: str, timeout: float | None,
                    actor: str | None = None, owner: str | None = None) -> list[DeviceLock]:
        key_hash = locktable.hash_key(lock_key)
        records, _ = await self._transact(
            lambda txn: locktable.renew(txn, key_hash, timeout, owner), actor)
        return [r.public() for r in records]

    async def force_release(self, device_name: str, actor: str | None = None,
                            reason: str | None = None) -> list[DeviceLock]:
        records, _ = await self._transact(
            lambda txn: locktable.force_release(txn, device_name, reason), actor)
        return [r.public() for r in records]

    async def sweep(self, limit: int = 1000) -> int:
        """Expire every lock whose lease ran out (and drop stale wait tickets)."""
        now = await self.now()
        due = await self._due(now, limit)
        gone, _ = await self._transact(lambda txn: locktable.expire(txn, due))
        return len(gone)

    async def all_locks(self) -> list[DeviceLock]:
        """Every live lock, active and preempted, ordered by device name then priority."""
        now = await self.now()
        recs = [r for r in await self._all_records() if r.live(now)]
        recs.sort(key=lambda r: (r.device_name, r.priority))
        return [r.public() for r in recs]

    async def device_status(self, device_name: str) -> LockStatus:
        active, preempted, components = await self._read(
            lambda txn: locktable.device_status(txn, device_name))
        return LockStatus(
            device_name=device_name,
            locked=active is not None,
            lock=active.public() if active else None,
            preempted=[r.public() for r in preempted],
            component_locks=[r.public() for r in components],
            timestamp=utcnow(),
        )
