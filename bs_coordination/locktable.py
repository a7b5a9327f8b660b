"""The lock rules of DESIGN.md as a pure state machine: no I/O, no clock, no randomness.

Every operation runs inside a ``Txn``: a copy-on-write overlay over a read-only ``TableView``
of the stored state. The operation reads through the overlay, raises a ``CoordinationError``
to refuse (then the overlay is dropped and nothing changes), or returns normally, after which
the store persists ``txn.changes()`` (records put and deleted, counters, waiters, events)
atomically. Both stores run exactly this code; a store only decides how a view is read and
how changes are written.

The rules (numbers as in DESIGN.md):

1. a free device is granted at once;
2. a strictly higher priority preempts the active holder, which becomes ``preempted`` and is
   restored (with a fresh token) when no higher-priority lock overlaps it any more;
3. equal or lower priority is refused with the holders' public records; ``wait`` queues the
   request (priority, then arrival) - see ``enqueue``;
4. several devices are granted together under one key, or none is;
5. leases: a lock with ``expires_at <= now`` is invisible and is swept with an ``expired`` event;
6. release needs the key (403 if the device is held under another key, 404 if the key holds
   nothing there); force release removes every lock on exactly one name;
7. presenting a key with a higher-priority type upgrades in place; a ``QUEUE_EXECUTING`` grant
   with a ``plan_uid`` consumes the ``QUEUE_QUEUED`` reservations of that plan;
8. names are dotted: a name overlaps itself, its ancestors and its descendants;
9. every grant (and restore) takes the next value of one service-wide fencing counter;
10. preemption handshake: a holder that asked for it (``acknowledge_preemption``) and is
    displaced gets ``preemption_ack = pending`` with a deadline; ``acknowledge`` (its key)
    makes it ``acknowledged`` (with the time), ``time_out_acks`` (the preemptor's request, at
    the deadline, or else the sweep: ``due_at``) ``timed_out``; a restore, an upgrade or a
    new preemption starts afresh.
    ``handshake_outcome`` tells a waiting preemptor where its displaced holders stand.

The states a lock passes through: ``active`` -> (displaced by a higher priority) ``preempted``
[handshake: ``pending`` -> ``acknowledged`` | ``timed_out``] -> (nothing higher overlaps any
more) ``active`` again with a fresh token; from any state it may end: ``released``,
``expired``, ``force_released`` or ``consumed``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Protocol

from bs_coordination.errors import (
    InvalidRequestError,
    LockConflictError,
    LockNotFoundError,
    LockNotOwnedError,
)
from bs_coordination.models import (
    DeviceLock,
    LockAction,
    LockHolder,
    LockRequest,
    LockState,
    LockType,
    PreemptionAck,
    names_overlap,
)

TOKEN_COUNTER = "token"
TICKET_COUNTER = "ticket"
#: Seconds a preemptor waits for the displaced holders' acknowledgement, unless configured.
DEFAULT_PREEMPT_ACK_TIMEOUT = 2.0

RecordId = tuple[str, str]  # (device_name, key_hash)


def hash_key(lock_key: str) -> str:
    """The stored form of a lock key: only its SHA-256 is ever kept."""
    return hashlib.sha256(lock_key.encode()).hexdigest()


def ancestors(name: str) -> Iterator[str]:
    """``a.b.c`` -> ``a``, ``a.b`` (proper prefixes at dot boundaries)."""
    pos = name.find(".")
    while pos != -1:
        yield name[:pos]
        pos = name.find(".", pos + 1)


def to_datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(slots=True)
class LockRecord:
    """A stored lock on one device. ``key_hash`` is secret; ``public()`` leaves it out."""

    device_name: str
    lock_type: LockType
    user_id: str
    key_hash: str
    token: int
    acquired_at: float
    expires_at: float | None
    reason: str | None = None
    plan_uid: str | None = None
    state: LockState = LockState.ACTIVE
    preempted_by: dict[str, Any] | None = None
    #: The holder acknowledges preemption (rule 10).
    ack_requested: bool = False
    #: Handshake state while preempted (``None``: active, or no handshake asked for).
    ack: PreemptionAck | None = None
    ack_deadline: float | None = None
    acknowledged_at: float | None = None
    #: ``public()``'s answer, made once: a record is never changed in place (a change is a new
    #: record, made with ``replace``, which starts without it).
    _public: DeviceLock | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def id(self) -> RecordId:
        return (self.device_name, self.key_hash)

    @property
    def priority(self) -> int:
        return self.lock_type.priority

    @property
    def active(self) -> bool:
        return self.state is LockState.ACTIVE

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now

    @property
    def due_at(self) -> float | None:
        """When the sweeper must look at this record (the stores index records by it): the
        lease's end, or a pending handshake's deadline when that comes first. So a handshake
        times out at its deadline even when nobody waits for it any more (the preemptor's
        replica died mid-handshake)."""
        if self.ack is PreemptionAck.PENDING and self.ack_deadline is not None:
            if self.expires_at is None or self.ack_deadline < self.expires_at:
                return self.ack_deadline
        return self.expires_at

    def holder(self) -> LockHolder:
        return LockHolder(
            device_name=self.device_name,
            lock_type=self.lock_type,
            priority=self.priority,
            user_id=self.user_id,
            reason=self.reason,
            plan_uid=self.plan_uid,
            acquired_at=to_datetime(self.acquired_at),  # type: ignore[arg-type]
            expires_at=to_datetime(self.expires_at),
        )

    def public(self) -> DeviceLock:
        """The record as everyone but its acquirer sees it (the same object on every call:
        treat it as read-only)."""
        if self._public is None:
            self._public = self._make_public()
        return self._public

    def _make_public(self) -> DeviceLock:
        return DeviceLock(
            device_name=self.device_name,
            lock_type=self.lock_type,
            priority=self.priority,
            user_id=self.user_id,
            reason=self.reason,
            plan_uid=self.plan_uid,
            acquired_at=to_datetime(self.acquired_at),  # type: ignore[arg-type]
            expires_at=to_datetime(self.expires_at),
            token=self.token,
            state=self.state,
            preempted_by=LockHolder.model_validate(self.preempted_by) if self.preempted_by else None,
            acknowledge_preemption=self.ack_requested,
            preemption_ack=self.ack,
            ack_deadline=to_datetime(self.ack_deadline),
            acknowledged_at=to_datetime(self.acknowledged_at),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form for stores that serialise records."""
        return {
            "device_name": self.device_name,
            "lock_type": self.lock_type.value,
            "user_id": self.user_id,
            "key_hash": self.key_hash,
            "token": self.token,
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
            "reason": self.reason,
            "plan_uid": self.plan_uid,
            "state": self.state.value,
            "preempted_by": self.preempted_by,
            "ack_requested": self.ack_requested,
            "ack": None if self.ack is None else self.ack.value,
            "ack_deadline": self.ack_deadline,
            "acknowledged_at": self.acknowledged_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LockRecord:
        return cls(
            device_name=d["device_name"],
            lock_type=LockType(d["lock_type"]),
            user_id=d["user_id"],
            key_hash=d["key_hash"],
            token=int(d["token"]),
            acquired_at=float(d["acquired_at"]),
            expires_at=None if d.get("expires_at") is None else float(d["expires_at"]),
            reason=d.get("reason"),
            plan_uid=d.get("plan_uid"),
            state=LockState(d.get("state", "active")),
            preempted_by=d.get("preempted_by"),
            ack_requested=bool(d.get("ack_requested", False)),
            ack=None if d.get("ack") is None else PreemptionAck(d["ack"]),
            ack_deadline=None if d.get("ack_deadline") is None else float(d["ack_deadline"]),
            acknowledged_at=(None if d.get("acknowledged_at") is None
                             else float(d["acknowledged_at"])),
        )


@dataclass(slots=True, frozen=True)
class Waiter:
    """A request queued with ``wait``: it goes before later or lower-priority requests."""

    ticket: int
    names: tuple[str, ...]
    priority: int
    deadline: float

    def ahead_of(self, priority: int, ticket: int | None) -> bool:
        if self.priority != priority:
            return self.priority < priority
        return ticket is None or self.ticket < ticket

    def to_dict(self) -> dict[str, Any]:
        return {"ticket": self.ticket, "names": list(self.names), "priority": self.priority,
                "deadline": self.deadline}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Waiter:
        return cls(int(d["ticket"]), tuple(d["names"]), int(d["priority"]), float(d["deadline"]))


@dataclass(slots=True)
class Event:
    """A change, before the store gives it an id."""

    action: LockAction
    record: LockRecord
    timestamp: float
    actor: str | None = None
    #: Why it was done, when the one who did it said (a force release's reason).
    reason: str | None = None


class TableView(Protocol):
    """Read access to the stored table. A store may raise from any method to say "load more
    and run again" (the Redis store does); the lock table never catches such errors."""

    def records_at(self, name: str) -> Iterable[LockRecord]:
        """Records (any state, expired ones included) on exactly ``name``."""

    def names_under(self, name: str) -> Iterable[str]:
        """Names strictly below ``name`` (``name.*``) that hold records."""

    def names_of_key(self, key_hash: str) -> Iterable[str]:
        """Names holding a record under ``key_hash``."""

    def waiters(self) -> Iterable[Waiter]:
        """Queued requests."""

    def counter(self, name: str) -> int:
        """Last value handed out by counter ``name`` (0 if never used)."""


@dataclass
class Changes:
    """What one successful operation changed; a store writes it atomically."""

    puts: dict[RecordId, LockRecord] = field(default_factory=dict)
    deletes: dict[RecordId, LockRecord] = field(default_factory=dict)  # id -> record as it was
    counters: dict[str, int] = field(default_factory=dict)
    waiters_put: dict[int, Waiter] = field(default_factory=dict)
    waiters_deleted: set[int] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.puts or self.deletes or self.counters or self.waiters_put
                    or self.waiters_deleted or self.events)


class Txn:
    """A copy-on-write overlay over a ``TableView`` for one operation at time ``now``."""

    def __init__(self, view: TableView, now: float, actor: str | None = None) -> None:
        self.view = view
        self.now = now
        self.actor = actor
        self._records: dict[str, dict[str, LockRecord]] = {}  # name -> key_hash -> record
        self._key_names: dict[str, set[str]] = {}
        self._under: dict[str, set[str]] = {}
        self._waiters: dict[int, Waiter] | None = None
        self._ch = Changes()

    # -- reads -------------------------------------------------------------------------
    def _at(self, name: str) -> dict[str, LockRecord]:
        recs = self._records.get(name)
        if recs is None:
            recs = {r.key_hash: r for r in self.view.records_at(name)}
            self._records[name] = recs
        return recs

    def _under_names(self, name: str) -> set[str]:
        names = self._under.get(name)
        if names is None:
            names = set(self.view.names_under(name))
            self._under[name] = names
        return names

    def key_names(self, key_hash: str) -> set[str]:
        names = self._key_names.get(key_hash)
        if names is None:
            names = set(self.view.names_of_key(key_hash))
            self._key_names[key_hash] = names
        return names

    def get(self, name: str, key_hash: str) -> LockRecord | None:
        return self._at(name).get(key_hash)

    def at(self, name: str) -> list[LockRecord]:
        """Live records on exactly ``name``."""
        return [r for r in self._at(name).values() if r.live(self.now)]

    def overlapping(self, name: str, *, include_expired: bool = False) -> list[LockRecord]:
        """Records on ``name``, its ancestors and its descendants (live ones unless asked)."""
        under = self._under_names(name)
        if under or "." in name:
            out: list[LockRecord] = []
            for n in (*ancestors(name), name, *sorted(under)):
                out.extend(self._at(n).values())
        else:  # the common case, a top-level name with nothing locked below it
            out = list(self._at(name).values())
        if include_expired:
            return out
        return [r for r in out if r.live(self.now)]

    def of_key(self, key_hash: str) -> dict[str, LockRecord]:
        """Live records of a key, by device name."""
        out = {}
        for n in self.key_names(key_hash):
            r = self.get(n, key_hash)
            if r is not None and r.live(self.now) and hmac.compare_digest(r.key_hash, key_hash):
                out[n] = r
        return out

    def waiters(self) -> dict[int, Waiter]:
        if self._waiters is None:
            self._waiters = {w.ticket: w for w in self.view.waiters()}
        return self._waiters

    # -- writes ------------------------------------------------------------------------
    def next(self, counter: str) -> int:
        value = self._ch.counters.get(counter)
        if value is None:
            value = self.view.counter(counter)
        self._ch.counters[counter] = value + 1
        return value + 1

    def put(self, rec: LockRecord) -> None:
        recs = self._at(rec.device_name)
        if rec.key_hash not in recs:
            for a in ancestors(rec.device_name):
                self._under_names(a).add(rec.device_name)
        recs[rec.key_hash] = rec
        self.key_names(rec.key_hash).add(rec.device_name)
        self._ch.puts[rec.id] = rec

    def delete(self, rec: LockRecord) -> None:
        recs = self._at(rec.device_name)
        if recs.pop(rec.key_hash, None) is None:
            return
        if not recs:
            for a in ancestors(rec.device_name):
                self._under_names(a).discard(rec.device_name)
        self.key_names(rec.key_hash).discard(rec.device_name)
        self._ch.puts.pop(rec.id, None)
        self._ch.deletes.setdefault(rec.id, rec)

    def emit(self, action: LockAction, rec: LockRecord, reason: str | None = None) -> None:
        # Records are never changed in place (a change is a new record, made with
        # ``replace``), so the event shares the record instead of copying it.
        self._ch.events.append(Event(action, rec, self.now, self.actor, reason))

    def put_waiter(self, w: Waiter) -> None:
        self.waiters()[w.ticket] = w
        self._ch.waiters_put[w.ticket] = w

    def delete_waiter(self, ticket: int) -> None:
        if self.waiters().pop(ticket, None) is not None:
            self._ch.waiters_put.pop(ticket, None)
            self._ch.waiters_deleted.add(ticket)

    def changes(self) -> Changes:
        # A record deleted and put again in one operation is a put.
        for rid in list(self._ch.deletes):
            if rid in self._ch.puts:
                del self._ch.deletes[rid]
        return self._ch


# -- describing holders ------------------------------------------------------------------

def describe(rec: LockRecord | DeviceLock) -> str:
    """One line naming the holder: who, which type, why, since when, until when."""
    until = rec.expires_at
    text = f"{rec.device_name!r} is held by {rec.user_id!r} ({rec.lock_type.value}"
    if rec.state is LockState.PREEMPTED:
        text += ", preempted"
    text += ")"
    if rec.reason:
        text += f", reason: {rec.reason!r}"
    if isinstance(rec, LockRecord):
        acquired = to_datetime(rec.acquired_at)
        expires = to_datetime(until) if isinstance(until, float) else None
    else:
        acquired, expires = rec.acquired_at, rec.expires_at
    text += f", since {acquired.isoformat() if acquired else '?'}"
    text += f", until {expires.isoformat()}" if expires else ", no expiry"
    return text


# -- operations --------------------------------------------------------------------------

def _drop_expired(txn: Txn, names: Iterable[str]) -> list[str]:
    """Remove (with an ``expired`` event) the expired records touching ``names``; returns
    their names."""
    gone = []
    for n in names:
        for r in txn.overlapping(n, include_expired=True):
            if not r.live(txn.now) and txn.get(r.device_name, r.key_hash) is r:
                txn.delete(r)
                txn.emit(LockAction.EXPIRED, r)
                gone.append(r.device_name)
    return gone


def _expire_overlapping(txn: Txn, names: Iterable[str]) -> None:
    """Remove (with an ``expired`` event) the expired records touching ``names``, then
    restore what waited under them."""
    gone = _drop_expired(txn, names)
    if gone:
        settle(txn, gone)


def settle(txn: Txn, names: Iterable[str]) -> None:
    """Restore preempted locks on names overlapping ``names`` that nothing outranks any more.

    A preempted lock is restored only when no overlapping lock of another key has a higher
    priority (active or preempted), so a restore never displaces anyone. Candidates are taken
    highest priority first, so a restored lock keeps lower ones preempted.
    """
    candidates: dict[RecordId, LockRecord] = {}
    for n in names:
        for r in txn.overlapping(n):
            if not r.active:
                candidates[r.id] = r
    for cand in sorted(candidates.values(), key=lambda r: (r.priority, r.token)):
        cur = txn.get(cand.device_name, cand.key_hash)
        if cur is None or cur.active or not cur.live(txn.now):
            continue
        # A lock that outranked it and has run out (but was not among the records this
        # operation was asked to expire) goes first, with its ``expired`` event: the event
        # stream must never show the restored lock beside a higher one still active.
        _drop_expired(txn, [cur.device_name])
        outranked = any(
            o.key_hash != cur.key_hash and (o.priority < cur.priority or o.active)
            for o in txn.overlapping(cur.device_name)
        )
        if not outranked:
            restored = replace(cur, state=LockState.ACTIVE, preempted_by=None,
                               token=txn.next(TOKEN_COUNTER), ack=None, ack_deadline=None,
                               acknowledged_at=None)
            txn.put(restored)
            txn.emit(LockAction.RESTORED, restored)


def _consumes(req: LockRequest, other: LockRecord) -> bool:
    """Rule 7: a plan's QUEUE_EXECUTING grant takes over its own QUEUE_QUEUED reservations."""
    return (
        req.lock_type is LockType.QUEUE_EXECUTING
        and req.plan_uid is not None
        and other.lock_type is LockType.QUEUE_QUEUED
        and other.plan_uid == req.plan_uid
    )


def _conflict(names: list[str], blockers: list[LockRecord], queued: list[Waiter]) -> LockConflictError:
    if blockers:
        first = blockers[0]
        msg = f"Device {first.device_name!r} is not available: {describe(first)}"
        if len(blockers) > 1:
            msg += f" (and {len(blockers) - 1} more)"
    else:
        msg = (f"Device(s) {', '.join(repr(n) for n in names)} promised to "
               f"{len(queued)} earlier waiting request(s) of equal or higher priority")
    unique = {b.id: b for b in blockers}
    return LockConflictError(msg, [b.public() for b in unique.values()])


def request(
    txn: Txn,
    req: LockRequest,
    key_hash: str,
    *,
    presented: bool,
    ticket: int | None = None,
    owner: str | None = None,
    ack_timeout: float = DEFAULT_PREEMPT_ACK_TIMEOUT,
    displaced: list[LockRecord] | None = None,
    retry: bool = False,
) -> list[LockRecord]:
    """Grant ``req`` under ``key_hash`` (all its devices, or none) or raise.

    ``presented``: the key came with the request (upgrade / add devices under it); otherwise
    it is a fresh key. ``ticket``: the request's place in the wait queue, if it has one.
    ``owner``: who must hold the presented key's locks (see ``_check_owner``).
    ``ack_timeout``: how long a displaced holder that asked for the handshake has to
    acknowledge (rule 10); such holders are appended to ``displaced`` when given.
    ``retry``: the key comes from the request's Idempotency-Key: if it already holds locks,
    this is the same request sent again, answered with the same grant (``_same_grant``).
    Returns the key's records on the requested names.
    """
    now, p, names = txn.now, req.lock_type.priority, req.names
    _expire_overlapping(txn, names)
    if retry and not presented:
        earlier = txn.of_key(key_hash)
        if earlier:
            return _same_grant(txn, req, earlier, displaced)
    own = txn.of_key(key_hash) if presented else {}
    if presented and not own:
        raise LockNotFoundError("No lock is held under the presented lock_key")
    _check_owner(own.values(), owner, "extend or upgrade")
    _check_same_holder(own.values(), req.user_id)

    expires = None if req.timeout is None else now + req.timeout
    grants: list[tuple[str, LockRecord | None]] = []  # new locks and upgrades
    renewals: list[LockRecord] = []  # this key already holds the device at this priority
    for n in names:
        mine = own.get(n)
        if mine is not None:
            if p < mine.priority:
                grants.append((n, mine))
            else:
                renewals.append(mine)
            continue
        if any(a in own for a in ancestors(n)):
            continue  # already covered by this key's lock on an ancestor
        below = [o for o in own if o.startswith(n + ".")]
        if below:
            raise InvalidRequestError(
                f"device_names: this key already holds {below[0]!r}, a component of {n!r}; "
                "release it first or lock the component only", field="device_names")
        grants.append((n, None))

    blockers = [o for n, _ in grants for o in txn.overlapping(n)
                if o.key_hash != key_hash and not _consumes(req, o) and o.priority <= p]
    queued = [w for w in txn.waiters().values()
              if w.deadline > now and w.ticket != ticket and w.ahead_of(p, ticket)
              and any(_overlaps_any(n, w.names) for n, _ in grants)]
    if blockers or queued:
        raise _conflict(names, blockers, queued)

    token = txn.next(TOKEN_COUNTER) if grants else 0
    for n, mine in grants:
        if mine is None:
            rec = LockRecord(
                device_name=n, lock_type=req.lock_type, user_id=req.user_id, key_hash=key_hash,
                token=token, acquired_at=now, expires_at=expires, reason=req.reason,
                plan_uid=req.plan_uid, ack_requested=req.acknowledge_preemption,
            )
            action = LockAction.ACQUIRED
        else:
            rec = replace(mine, lock_type=req.lock_type, token=token, expires_at=expires,
                          state=LockState.ACTIVE, preempted_by=None,
                          reason=req.reason or mine.reason, plan_uid=req.plan_uid or mine.plan_uid,
                          ack_requested=req.acknowledge_preemption or mine.ack_requested,
                          ack=None, ack_deadline=None, acknowledged_at=None)
            action = LockAction.UPGRADED
        for o in txn.overlapping(n):
            if o.key_hash == key_hash:
                continue
            if _consumes(req, o):
                txn.delete(o)
                txn.emit(LockAction.CONSUMED, o)
            elif o.active:
                handshake = o.ack_requested
                moved = replace(o, state=LockState.PREEMPTED,
                                preempted_by=rec.holder().model_dump(mode="json"),
                                ack=PreemptionAck.PENDING if handshake else None,
                                ack_deadline=now + ack_timeout if handshake else None,
                                acknowledged_at=None)
                txn.put(moved)
                txn.emit(LockAction.PREEMPTED, moved)
                if handshake and displaced is not None:
                    displaced.append(moved)
        txn.put(rec)
        txn.emit(action, rec)
    if req.timeout is not None:
        for mine in renewals:
            if mine.expires_at != expires:
                renewed = replace(mine, expires_at=expires)
                txn.put(renewed)
                txn.emit(LockAction.RENEWED, renewed)
    if ticket is not None:
        txn.delete_waiter(ticket)
    held = txn.of_key(key_hash)
    out: list[LockRecord] = []
    seen: set[int] = set()
    for n in names:
        covering = held.get(n) or next((held[a] for a in ancestors(n) if a in held), None)
        if covering is not None and id(covering) not in seen:
            seen.add(id(covering))
            out.append(covering)
    return out


def _same_grant(txn: Txn, req: LockRequest, earlier: dict[str, LockRecord],
                displaced: list[LockRecord] | None) -> list[LockRecord]:
    """A request sent again with its Idempotency-Key: the grant it got the first time, as it
    stands now (same key, same tokens), and the holders that grant displaced with a
    handshake (into ``displaced``), so the answer waits for them as the first one did. A
    different request under the same Idempotency-Key is refused."""
    same = (set(earlier) == set(req.names)
            and all(r.lock_type is req.lock_type and r.user_id == req.user_id
                    and r.plan_uid == req.plan_uid for r in earlier.values()))
    if not same:
        raise InvalidRequestError(
            "Idempotency-Key: already used for another lock request (other devices, type, "
            "user or plan); send a new key with a new request", field="Idempotency-Key")
    records = [earlier[n] for n in req.names]
    if displaced is not None:
        for rec in records:
            holder = rec.holder().model_dump(mode="json")
            displaced.extend(o for o in txn.overlapping(rec.device_name)
                             if o.key_hash != rec.key_hash and not o.active
                             and o.ack is not None and o.preempted_by == holder)
    return records


def _overlaps_any(name: str, others: Iterable[str]) -> bool:
    return any(names_overlap(name, o) for o in others)


def _check_same_holder(records: Iterable[LockRecord], user_id: str) -> None:
    """A presented key extends or upgrades its own holder's locks only: another ``user_id``
    (with authentication off, or an admin) is refused, so one key never holds two people's
    locks."""
    for r in records:
        if r.user_id != user_id:
            raise InvalidRequestError(
                f"user_id: the presented lock_key is held by {r.user_id!r}, not {user_id!r}; "
                "a key extends or upgrades only its own holder's locks", field="user_id")


def _check_owner(records: Iterable[LockRecord], owner: str | None, what: str) -> None:
    """With authentication on, a key alone is not enough: ``owner`` (the caller's principal,
    ``None`` for an admin or with authentication off) must hold every lock touched."""
    if owner is None:
        return
    for r in records:
        if r.user_id != owner:
            raise LockNotOwnedError(
                f"Device {r.device_name!r} is locked by {r.user_id!r}: only they or an admin "
                f"may {what} it")


def release(txn: Txn, key_hash: str, device_name: str | None = None,
            owner: str | None = None) -> list[LockRecord]:
    """Release the key's lock on ``device_name`` (or all its locks), then restore what waits.
    ``owner``: see ``_check_owner``."""
    own = txn.of_key(key_hash)
    if device_name is None:
        if not own:
            raise LockNotFoundError("No lock is held under this lock_key")
        targets = list(own.values())
    else:
        mine = own.get(device_name)
        if mine is None:
            others = txn.at(device_name)
            if others:
                raise LockNotOwnedError(
                    f"Device {device_name!r} is locked under another key: {describe(others[0])}")
            raise LockNotFoundError(f"No lock on device {device_name!r} under this lock_key")
        targets = [mine]
    _check_owner(targets, owner, "release")
    for r in targets:
        txn.delete(r)
        txn.emit(LockAction.RELEASED, r)
    settle(txn, [r.device_name for r in targets])
    return targets


def renew(txn: Txn, key_hash: str, timeout: float | None,
          owner: str | None = None) -> list[LockRecord]:
    """Set every lock of the key to expire ``timeout`` seconds from now. ``owner``: see
    ``_check_owner``."""
    own = txn.of_key(key_hash)
    if not own:
        raise LockNotFoundError("No lock is held under this lock_key (it may have expired)")
    _check_owner(own.values(), owner, "renew")
    if timeout is None:
        queue = [r for r in own.values() if r.lock_type.needs_lease]
        if queue:
            raise InvalidRequestError(
                f"timeout: a {queue[0].lock_type.value} lock must keep a lease", field="timeout")
    expires = None if timeout is None else txn.now + timeout
    out = []
    for r in own.values():
        renewed = replace(r, expires_at=expires)
        txn.put(renewed)
        txn.emit(LockAction.RENEWED, renewed)
        out.append(renewed)
    return out


def force_release(txn: Txn, device_name: str, reason: str | None = None) -> list[LockRecord]:
    """Remove every lock on exactly ``device_name`` (admin), then restore what waits. Each
    ``force_released`` event carries ``reason``."""
    _expire_overlapping(txn, [device_name])
    targets = txn.at(device_name)
    if not targets:
        raise LockNotFoundError(f"No lock on device {device_name!r}")
    for r in sorted(targets, key=lambda r: r.priority):
        txn.delete(r)
        txn.emit(LockAction.FORCE_RELEASED, r, reason)
    settle(txn, [device_name])
    return targets


def expire(txn: Txn, due: Iterable[RecordId]) -> list[LockRecord]:
    """Sweep the given records (``due_at`` passed): remove those really expired, then restore
    what waits; time out a handshake still pending at its deadline (rule 10)."""
    gone = []
    for name, key_hash in due:
        r = txn.get(name, key_hash)
        if r is None:
            continue
        if not r.live(txn.now):
            txn.delete(r)
            txn.emit(LockAction.EXPIRED, r)
            gone.append(r)
        elif r.ack is PreemptionAck.PENDING and r.due_at is not None and r.due_at <= txn.now:
            _time_out(txn, r)
    if gone:
        settle(txn, [r.device_name for r in gone])
    for w in list(txn.waiters().values()):
        if w.deadline <= txn.now:
            txn.delete_waiter(w.ticket)
    return gone


def enqueue(txn: Txn, names: list[str], priority: int, wait: float) -> int:
    """Queue a refused request for up to ``wait`` seconds; returns its ticket."""
    ticket = txn.next(TICKET_COUNTER)
    txn.put_waiter(Waiter(ticket, tuple(names), priority, txn.now + wait))
    return ticket


def dequeue(txn: Txn, ticket: int) -> None:
    txn.delete_waiter(ticket)


# -- the preemption handshake (rule 10) --------------------------------------------------

def acknowledge(txn: Txn, key_hash: str, device_name: str | None = None,
                owner: str | None = None) -> list[LockRecord]:
    """The holder of ``key_hash`` says it stopped using its preempted devices (``device_name``,
    or all of them): a pending handshake becomes ``acknowledged`` now; one that timed out
    keeps ``timed_out`` but records the late acknowledgement's time. Each gives an
    ``acknowledged`` event. Returns the records acknowledged (none: nothing was waiting).
    ``owner``: see ``_check_owner``."""
    own = txn.of_key(key_hash)
    if device_name is not None:
        mine = own.get(device_name)
        if mine is None:
            others = txn.at(device_name)
            if others:
                raise LockNotOwnedError(
                    f"Device {device_name!r} is locked under another key: {describe(others[0])}")
            raise LockNotFoundError(f"No lock on device {device_name!r} under this lock_key")
        own = {device_name: mine}
    elif not own:
        raise LockNotFoundError("No lock is held under this lock_key (it may have expired)")
    _check_owner(own.values(), owner, "acknowledge a preemption of")
    out = []
    for r in own.values():
        if r.ack is PreemptionAck.PENDING:
            done = replace(r, ack=PreemptionAck.ACKNOWLEDGED, acknowledged_at=txn.now)
        elif r.ack is PreemptionAck.TIMED_OUT and r.acknowledged_at is None:
            done = replace(r, acknowledged_at=txn.now)
        else:
            continue
        txn.put(done)
        txn.emit(LockAction.ACKNOWLEDGED, done)
        out.append(done)
    return out


def _current(txn: Txn, rec: LockRecord) -> LockRecord | None:
    """``rec`` as stored now, if it is still the same grant (same token) and live."""
    cur = txn.get(rec.device_name, rec.key_hash)
    if cur is None or cur.token != rec.token or not cur.live(txn.now):
        return None
    return cur


def time_out_acks(txn: Txn, displaced: Iterable[LockRecord]) -> list[LockRecord]:
    """The deadline came (the waiting preemptor decides when): every handshake of
    ``displaced`` still pending becomes ``timed_out``, with an ``ack_timeout`` event."""
    out = []
    for d in displaced:
        cur = _current(txn, d)
        if cur is not None and cur.ack is PreemptionAck.PENDING:
            out.append(_time_out(txn, cur))
    return out


def _time_out(txn: Txn, rec: LockRecord) -> LockRecord:
    late = replace(rec, ack=PreemptionAck.TIMED_OUT)
    txn.put(late)
    txn.emit(LockAction.ACK_TIMEOUT, late)
    return late


@dataclass(slots=True)
class Handshake:
    """Where a preemptor's handshake stands (``handshake_outcome``)."""

    #: Displaced holders still to acknowledge.
    pending: list[LockRecord]
    #: Displaced locks as they stand now (``None``: gone, or restored under a new token).
    current: list[LockRecord | None]
    #: Every displaced holder still there acknowledged in time.
    acknowledged: bool
    #: One of the preemptor's own grants is gone (expired or force-released meanwhile).
    lost: LockRecord | None


def handshake_outcome(txn: Txn, granted: Iterable[LockRecord],
                      displaced: list[LockRecord]) -> Handshake:
    """Where the handshake of a grant (its records ``granted``; the holders it displaced
    that asked for the handshake, ``displaced``) stands now. A displaced lock that is gone
    (released, expired, force-released) or restored no longer holds anyone's answer back;
    whether it counts as acknowledged is for the caller to say (``acknowledged`` covers the
    others only)."""
    current = [_current(txn, d) for d in displaced]
    pending = [c for c in current if c is not None and c.ack is PreemptionAck.PENDING]
    acknowledged = all(c is None or c.ack is PreemptionAck.ACKNOWLEDGED for c in current)
    lost = next((g for g in granted if _current(txn, g) is None), None)
    return Handshake(pending, current, acknowledged, lost)


def device_status(txn: Txn, name: str) -> tuple[LockRecord | None, list[LockRecord], list[LockRecord]]:
    """(active lock covering ``name``, preempted locks on it or its ancestors, locks on its
    components). The active lock may be an ancestor's."""
    active = None
    preempted = []
    for n in (*ancestors(name), name):
        for r in txn.at(n):
            if r.active:
                active = r
            else:
                preempted.append(r)
    components = [r for n in sorted(txn._under_names(name)) for r in txn.at(n)]
    preempted.sort(key=lambda r: r.priority)
    return active, preempted, components
