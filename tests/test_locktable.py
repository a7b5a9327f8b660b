"""The lock rules, checked against a plain model by hypothesis, plus the rules the model omits.

The model below is a deliberately naive re-statement of DESIGN.md's rules (lists and linear
scans, no indices, no overlay). The state machine drives the real lock table (through the
memory store's view) and the model with the same operations and compares the visible
outcome after every step, and checks the invariants the issue names.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from bs_coordination import locktable
from bs_coordination.errors import (
    CoordinationError,
    InvalidRequestError,
    LockConflictError,
    LockNotFoundError,
    LockNotOwnedError,
)
from bs_coordination.locktable import Txn, hash_key
from bs_coordination.models import (
    LockAction,
    LockRequest,
    LockState,
    LockType,
    PreemptionAck,
    names_overlap,
)
from bs_coordination.stores import ManualClock, MemoryStore

NAMES = ["a", "a.x", "a.y", "a.x.p", "b", "b.z"]
KEYS = ["k0", "k1", "k2", "k3", "k4", "k5"]


class Table:
    """The real lock table on the memory store's indexed state, driven synchronously."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.store = MemoryStore(clock=self.clock)
        #: The table as a client rebuilds it from the events alone (``replay``).
        self.replayed: dict[tuple[str, str], locktable.LockRecord] = {}

    def run(self, op, actor=None):
        txn = Txn(self.store, self.clock.now(), actor)
        result = op(txn)
        changes = txn.changes()
        for event in changes.events:
            self.replay(event)
        return result, self.store._apply(changes)

    def replay(self, event: locktable.Event) -> None:
        """Apply one event to the replayed table; at no event may it show two active holders
        (other keys) of overlapping names."""
        rec = event.record
        if event.action in (LockAction.RELEASED, LockAction.EXPIRED, LockAction.FORCE_RELEASED,
                            LockAction.CONSUMED):
            self.replayed.pop(rec.id, None)
        else:
            self.replayed[rec.id] = rec
        active = [r for r in self.replayed.values() if r.active]
        for i, a in enumerate(active):
            for b in active[i + 1:]:
                assert a.key_hash == b.key_hash or not names_overlap(a.device_name, b.device_name), (
                    f"after a {event.action.value} event of {rec.device_name!r} the events show "
                    f"two active holders: {a.device_name!r} ({a.lock_type.value}) and "
                    f"{b.device_name!r} ({b.lock_type.value})")

    def snapshot(self):
        return {r.id: (r.lock_type, r.state, r.expires_at, r.token)
                for recs in self.store._records.values() for r in recs.values()}

    def records(self):
        return [r for recs in self.store._records.values() for r in recs.values()]


def req(names, lock_type, user="u", timeout=60.0, plan_uid=None, lock_key=None, ack=False):
    return LockRequest(device_names=list(names), lock_type=lock_type, user_id=user,
                       timeout=timeout, plan_uid=plan_uid, lock_key=lock_key,
                       acknowledge_preemption=ack)


# -- the plain model ---------------------------------------------------------------------

@dataclass
class M:
    name: str
    key: str
    lock_type: LockType
    active: bool
    expires: float | None
    plan_uid: str | None
    ack_req: bool = False  # the holder asked for the preemption handshake
    ack: str | None = None  # while preempted: pending, acknowledged, timed_out
    acked_at: float | None = None
    deadline: float | None = None  # the pending handshake's deadline

    @property
    def prio(self) -> int:
        return self.lock_type.priority


class Model:
    def __init__(self) -> None:
        self.locks: list[M] = []

    def view(self):
        return {(m.name, hash_key(m.key)): (m.lock_type, m.active, m.expires, m.ack_req, m.ack,
                                            m.acked_at) for m in self.locks}

    def settle(self) -> None:
        for m in sorted((m for m in self.locks if not m.active), key=lambda m: m.prio):
            if not any(o.key != m.key and names_overlap(o.name, m.name) and (o.prio < m.prio or o.active)
                       for o in self.locks):
                m.active, m.ack, m.acked_at = True, None, None

    def request(self, names, lock_type, key, presented, timeout, plan_uid, now, ack=False):
        p = lock_type.priority
        own = [m for m in self.locks if m.key == key]
        if presented and not own:
            raise LockNotFoundError("")
        grants, renewals = [], []
        for n in names:
            mine = next((m for m in own if m.name == n), None)
            if mine is not None:
                (grants if p < mine.prio else renewals).append((n, mine))
                continue
            if any(names_overlap(m.name, n) and len(m.name) < len(n) for m in own):
                continue
            if any(names_overlap(m.name, n) for m in own):
                raise InvalidRequestError("")
            grants.append((n, None))

        def consumes(o):
            return (lock_type is LockType.QUEUE_EXECUTING and plan_uid is not None
                    and o.lock_type is LockType.QUEUE_QUEUED and o.plan_uid == plan_uid)

        for n, _ in grants:
            for o in self.locks:
                if o.key != key and names_overlap(o.name, n) and not consumes(o) and o.prio <= p:
                    raise LockConflictError("")
        expires = None if timeout is None else now + timeout
        for n, mine in grants:
            for o in list(self.locks):
                if o.key != key and names_overlap(o.name, n):
                    if consumes(o):
                        self.locks.remove(o)
                    elif o.active:
                        o.active, o.ack, o.acked_at = False, "pending" if o.ack_req else None, None
                        o.deadline = now + 2.0 if o.ack_req else None
            if mine is None:
                self.locks.append(M(n, key, lock_type, True, expires, plan_uid, ack))
            else:
                mine.lock_type, mine.active, mine.expires = lock_type, True, expires
                mine.ack_req, mine.ack, mine.acked_at = mine.ack_req or ack, None, None
        if timeout is not None:
            for _, mine in renewals:
                mine.expires = expires

    def release(self, key, name):
        own = [m for m in self.locks if m.key == key]
        if name is None:
            if not own:
                raise LockNotFoundError("")
            targets = own
        else:
            targets = [m for m in own if m.name == name]
            if not targets:
                if any(m.name == name for m in self.locks):
                    raise LockNotOwnedError("")
                raise LockNotFoundError("")
        for m in targets:
            self.locks.remove(m)
        self.settle()

    def acknowledge(self, key, name, now):
        own = [m for m in self.locks if m.key == key and (name is None or m.name == name)]
        if not own:
            if name is not None and any(m.name == name for m in self.locks):
                raise LockNotOwnedError("")
            raise LockNotFoundError("")
        for m in own:
            if m.ack == "pending":
                m.ack, m.acked_at = "acknowledged", now
            elif m.ack == "timed_out" and m.acked_at is None:
                m.acked_at = now

    def time_out(self):
        for m in self.locks:
            if m.ack == "pending":
                m.ack = "timed_out"

    def force_release(self, name):
        targets = [m for m in self.locks if m.name == name]
        if not targets:
            raise LockNotFoundError("")
        for m in targets:
            self.locks.remove(m)
        self.settle()

    def renew(self, key, timeout, now):
        own = [m for m in self.locks if m.key == key]
        if not own:
            raise LockNotFoundError("")
        for m in own:
            m.expires = now + timeout

    def expire(self, now):
        self.locks = [m for m in self.locks if m.expires is None or m.expires > now]
        for m in self.locks:  # nobody waits for these any more: the sweep times them out
            if m.ack == "pending" and m.deadline is not None and m.deadline <= now:
                m.ack = "timed_out"
        self.settle()


class LockTableMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.table = Table()
        self.model = Model()
        self.max_token = 0
        self.used_keys: set[str] = set()

    def _compare(self, sut_call, model_call):
        before = self.table.snapshot()
        sut_exc = model_exc = None
        try:
            _, events = self.table.run(sut_call)
        except CoordinationError as exc:
            sut_exc, events = exc, []
        try:
            model_call()
        except CoordinationError as exc:
            model_exc = exc
        assert type(sut_exc) is type(model_exc), (sut_exc, model_exc)
        if sut_exc is not None:
            assert self.table.snapshot() == before, "a refused request changed the table"
        # one grant (several devices under one key) shares one token; each restore gets its own
        granted = [e.lock.token for e in events
                   if e.action in (LockAction.ACQUIRED, LockAction.UPGRADED, LockAction.RESTORED)]
        assert all(tok > self.max_token for tok in granted), "tokens must strictly increase"
        self.max_token = max([self.max_token, *granted])
        return events

    @rule(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True),
          lock_type=st.sampled_from(list(LockType)), key=st.sampled_from(KEYS),
          timeout=st.sampled_from([None, 5.0, 50.0]), plan_uid=st.sampled_from([None, "p1", "p2"]),
          ack=st.booleans())
    def request(self, names, lock_type, key, timeout, plan_uid, ack):
        if any(names_overlap(a, b) for i, a in enumerate(names) for b in names[i + 1:]):
            return  # refused by the request model itself (422)
        if timeout is None and lock_type.needs_lease:
            timeout = 5.0
        presented = key in self.used_keys
        r = req(names, lock_type, timeout=timeout, plan_uid=plan_uid,
                lock_key=key if presented else None, ack=ack)
        now = self.table.clock.now()
        displaced: list[locktable.LockRecord] = []
        events = self._compare(
            lambda txn: locktable.request(txn, r, hash_key(key), presented=presented,
                                          ack_timeout=2.0, displaced=displaced),
            lambda: self.model.request(names, lock_type, key, presented, timeout, plan_uid, now,
                                       ack))
        # The grant's handshake waits for exactly the displaced holders that asked for it.
        told = {e.lock.device_name for e in events if e.action is LockAction.PREEMPTED
                and e.lock.preemption_ack is not None}
        assert {d.device_name for d in displaced} == told
        assert all(d.ack_deadline == now + 2.0 for d in displaced)
        if any(m.key == key for m in self.model.locks):
            self.used_keys.add(key)

    @rule(key=st.sampled_from(KEYS), name=st.one_of(st.none(), st.sampled_from(NAMES)))
    def release(self, key, name):
        self._compare(lambda txn: locktable.release(txn, hash_key(key), name),
                      lambda: self.model.release(key, name))

    @rule(key=st.sampled_from(KEYS), name=st.one_of(st.none(), st.sampled_from(NAMES)))
    def acknowledge(self, key, name):
        now = self.table.clock.now()
        events = self._compare(lambda txn: locktable.acknowledge(txn, hash_key(key), name),
                               lambda: self.model.acknowledge(key, name, now))
        assert all(e.action is LockAction.ACKNOWLEDGED and not e.lock.is_active for e in events)

    @rule()
    def handshake_deadline(self):
        """The waiting preemptors' deadlines come: pending handshakes time out."""
        pending = [r for r in self.table.records() if r.ack is PreemptionAck.PENDING]
        events = self._compare(lambda txn: locktable.time_out_acks(txn, pending),
                               lambda: self.model.time_out())
        assert all(e.action is LockAction.ACK_TIMEOUT for e in events)
        assert len(events) == len(pending)

    @rule(name=st.sampled_from(NAMES))
    def force_release(self, name):
        events = self._compare(lambda txn: locktable.force_release(txn, name),
                               lambda: self.model.force_release(name))
        assert all(e.action in (LockAction.FORCE_RELEASED, LockAction.RESTORED) for e in events)

    @rule(key=st.sampled_from(KEYS), timeout=st.sampled_from([5.0, 50.0]))
    def renew(self, key, timeout):
        now = self.table.clock.now()
        self._compare(lambda txn: locktable.renew(txn, hash_key(key), timeout),
                      lambda: self.model.renew(key, timeout, now))

    @rule(seconds=st.sampled_from([1.0, 5.0, 30.0]))
    def advance_and_sweep(self, seconds):
        self.table.clock.advance(seconds)
        now = self.table.clock.now()
        due = [r.id for r in self.table.records() if r.due_at is not None and r.due_at <= now]
        self._compare(lambda txn: locktable.expire(txn, due), lambda: self.model.expire(now))

    @rule(seconds=st.sampled_from([1.0, 5.0, 30.0]), data=st.data())
    def advance_and_sweep_in_parts(self, seconds, data):
        """A sweep that sees only some of the expired records first (a sweeper's batch limit,
        another replica's listing made a moment earlier), then the rest."""
        self.table.clock.advance(seconds)
        now = self.table.clock.now()
        due = [r.id for r in self.table.records() if r.due_at is not None and r.due_at <= now]
        first = data.draw(st.lists(st.sampled_from(due), unique=True)) if due else []
        _, events = self.table.run(lambda txn: locktable.expire(txn, first))
        restored = [e.lock.token for e in events if e.action is LockAction.RESTORED]
        assert all(tok > self.max_token for tok in restored), "tokens must strictly increase"
        self.max_token = max([self.max_token, *restored])
        self._compare(lambda txn: locktable.expire(txn, due), lambda: self.model.expire(now))

    @invariant()
    def replaying_the_events_gives_the_table(self):
        assert {rid: (r.lock_type, r.state, r.token) for rid, r in self.table.replayed.items()} \
            == {rid: (t, st_, tok) for rid, (t, st_, _, tok) in self.table.snapshot().items()}

    @invariant()
    def matches_model(self):
        sut = {r.id: (r.lock_type, r.active, r.expires_at, r.ack_requested,
                      None if r.ack is None else r.ack.value, r.acknowledged_at)
               for r in self.table.records()}
        assert sut == self.model.view()

    @invariant()
    def handshake_only_while_preempted(self):
        for r in self.table.records():
            if r.active or not r.ack_requested:
                assert (r.ack, r.ack_deadline, r.acknowledged_at) == (None, None, None)
            else:
                assert r.ack is not None and r.ack_deadline is not None
                assert (r.acknowledged_at is not None) == (r.ack is PreemptionAck.ACKNOWLEDGED) \
                    or r.ack is PreemptionAck.TIMED_OUT

    @invariant()
    def no_two_active_overlapping(self):
        active = [r for r in self.table.records() if r.active]
        for i, a in enumerate(active):
            for b in active[i + 1:]:
                assert a.key_hash == b.key_hash or not names_overlap(a.device_name, b.device_name)

    @invariant()
    def preempted_sits_under_higher(self):
        recs = self.table.records()
        for r in recs:
            if not r.active:
                assert r.preempted_by is not None
                assert any(o.key_hash != r.key_hash and names_overlap(o.device_name, r.device_name)
                           and o.priority < r.priority for o in recs)

    @invariant()
    def expired_are_gone(self):
        now = self.table.clock.now()
        assert all(r.live(now) for r in self.table.records())


TestLockTableMachine = LockTableMachine.TestCase
TestLockTableMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


# -- rules the model leaves out ----------------------------------------------------------

def test_preempted_lock_keeps_key_and_gets_fresh_token_on_restore():
    t = Table()
    (op,), _ = t.run(lambda txn: locktable.request(txn, req(["det1"], LockType.MANUAL_OPERATOR),
                                                   hash_key("op"), presented=False))
    (mt,), events = t.run(lambda txn: locktable.request(
        txn, req(["det1"], LockType.MAINTENANCE, user="maint"), hash_key("mt"), presented=False))
    assert [e.action for e in events] == [LockAction.PREEMPTED, LockAction.ACQUIRED]
    assert events[0].lock.preempted_by.user_id == "maint"
    _, events = t.run(lambda txn: locktable.release(txn, hash_key("mt")))
    assert [e.action for e in events] == [LockAction.RELEASED, LockAction.RESTORED]
    restored = events[1].lock
    assert restored.state is LockState.ACTIVE and restored.token > mt.token > op.token
    # the operator still releases with the original key
    _, events = t.run(lambda txn: locktable.release(txn, hash_key("op"), "det1"))
    assert [e.action for e in events] == [LockAction.RELEASED]


def test_preempted_lock_refuses_equal_priority_on_overlapping_names():
    t = Table()
    t.run(lambda txn: locktable.request(txn, req(["det1"], LockType.MANUAL_OPERATOR), hash_key("a"),
                                        presented=False))
    t.run(lambda txn: locktable.request(txn, req(["det1.cam"], LockType.MAINTENANCE), hash_key("m"),
                                        presented=False))
    with pytest.raises(LockConflictError) as info:
        t.run(lambda txn: locktable.request(txn, req(["det1.stats"], LockType.MANUAL_OPERATOR),
                                            hash_key("b"), presented=False))
    assert info.value.conflicts[0].device_name == "det1"
    assert info.value.conflicts[0].state is LockState.PREEMPTED


def test_conflict_names_the_holder():
    t = Table()
    r = LockRequest(device_name="motor1", lock_type=LockType.QUEUE_EXECUTING, user_id="queue",
                    reason="scan 42", timeout=60)
    t.run(lambda txn: locktable.request(txn, r, hash_key("q"), presented=False))
    with pytest.raises(LockConflictError) as info:
        t.run(lambda txn: locktable.request(txn, req(["motor1"], LockType.MANUAL_OPERATOR, user="bob"),
                                            hash_key("b"), presented=False))
    msg = info.value.message
    assert "motor1" in msg and "queue" in msg and "QUEUE_EXECUTING" in msg and "scan 42" in msg


def test_atomic_multi_device_grants_none_on_conflict():
    t = Table()
    t.run(lambda txn: locktable.request(txn, req(["m2"], LockType.MANUAL_OPERATOR), hash_key("a"),
                                        presented=False))
    with pytest.raises(LockConflictError):
        t.run(lambda txn: locktable.request(txn, req(["m1", "m2", "m3"], LockType.MANUAL_OPERATOR),
                                            hash_key("b"), presented=False))
    assert sorted(r.device_name for r in t.records()) == ["m2"]


def test_expired_holder_is_expired_then_replaced_in_one_operation():
    t = Table()
    t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MANUAL_OPERATOR, timeout=1.0),
                                        hash_key("a"), presented=False))
    t.clock.advance(1.0)  # the lease runs out at exactly this instant
    _, events = t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MANUAL_OPERATOR),
                                                    hash_key("b"), presented=False))
    assert [e.action for e in events] == [LockAction.EXPIRED, LockAction.ACQUIRED]


def test_reservation_consumed_by_its_plan_and_not_restored():
    t = Table()
    t.run(lambda txn: locktable.request(
        txn, req(["m1"], LockType.QUEUE_QUEUED, plan_uid="item-1"), hash_key("res"), presented=False))
    t.run(lambda txn: locktable.request(
        txn, req(["m2"], LockType.QUEUE_QUEUED, plan_uid="item-2"), hash_key("res2"), presented=False))
    _, events = t.run(lambda txn: locktable.request(
        txn, req(["m1", "m2"], LockType.QUEUE_EXECUTING, plan_uid="item-1"), hash_key("run"),
        presented=False))
    actions = [(e.action, e.device_name) for e in events]
    assert (LockAction.CONSUMED, "m1") in actions and (LockAction.PREEMPTED, "m2") in actions
    _, events = t.run(lambda txn: locktable.release(txn, hash_key("run")))
    restored = [e.device_name for e in events if e.action is LockAction.RESTORED]
    assert restored == ["m2"]


def test_upgrade_by_key_in_place():
    t = Table()
    (rec,), _ = t.run(lambda txn: locktable.request(
        txn, req(["m1"], LockType.QUEUE_QUEUED), hash_key("k"), presented=False))
    (up,), events = t.run(lambda txn: locktable.request(
        txn, req(["m1"], LockType.QUEUE_EXECUTING, lock_key="k"), hash_key("k"), presented=True))
    assert [e.action for e in events] == [LockAction.UPGRADED]
    assert up.lock_type is LockType.QUEUE_EXECUTING and up.token > rec.token


def test_waiting_requests_go_in_priority_then_arrival_order():
    t = Table()
    t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MANUAL_OPERATOR), hash_key("h"),
                                        presented=False))
    first, _ = t.run(lambda txn: locktable.enqueue(txn, ["m1"], LockType.MANUAL_OPERATOR.priority, 10))
    second, _ = t.run(lambda txn: locktable.enqueue(txn, ["m1"], LockType.MANUAL_OPERATOR.priority, 10))
    t.run(lambda txn: locktable.release(txn, hash_key("h")))
    # a newcomer without a ticket, and the second waiter, must let the first go first
    for key, ticket in (("new", None), ("w2", second)):
        with pytest.raises(LockConflictError):
            t.run(lambda txn, key=key, ticket=ticket: locktable.request(
                txn, req(["m1"], LockType.MANUAL_OPERATOR), hash_key(key), presented=False,
                ticket=ticket))
    t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MANUAL_OPERATOR), hash_key("w1"),
                                        presented=False, ticket=first))
    # a higher priority is never held back by lower waiters
    t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MAINTENANCE), hash_key("m"),
                                        presented=False))


def test_waiters_time_out():
    t = Table()
    t.run(lambda txn: locktable.enqueue(txn, ["m1"], LockType.MAINTENANCE.priority, 2))
    with pytest.raises(LockConflictError):
        t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MANUAL_OPERATOR),
                                            hash_key("x"), presented=False))
    t.clock.advance(2)
    t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MANUAL_OPERATOR), hash_key("x"),
                                        presented=False))


def test_release_wrong_key_and_unknown_key():
    t = Table()
    t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.MANUAL_OPERATOR), hash_key("a"),
                                        presented=False))
    with pytest.raises(LockNotOwnedError):
        t.run(lambda txn: locktable.release(txn, hash_key("b"), "m1"))
    with pytest.raises(LockNotFoundError):
        t.run(lambda txn: locktable.release(txn, hash_key("a"), "m2"))
    with pytest.raises(LockNotFoundError):
        t.run(lambda txn: locktable.release(txn, hash_key("b")))


def test_device_status_hierarchy():
    t = Table()
    t.run(lambda txn: locktable.request(txn, req(["det1"], LockType.MANUAL_OPERATOR), hash_key("a"),
                                        presented=False))
    active, preempted, components = t.run(lambda txn: locktable.device_status(txn, "det1.cam"))[0]
    assert active.device_name == "det1" and not preempted and not components
    t.run(lambda txn: locktable.release(txn, hash_key("a")))
    t.run(lambda txn: locktable.request(txn, req(["det1.cam"], LockType.MANUAL_OPERATOR),
                                        hash_key("b"), presented=False))
    active, preempted, components = t.run(lambda txn: locktable.device_status(txn, "det1"))[0]
    assert active is None and [c.device_name for c in components] == ["det1.cam"]


def test_renew_refuses_removing_a_queue_lease():
    t = Table()
    t.run(lambda txn: locktable.request(txn, req(["m1"], LockType.QUEUE_EXECUTING), hash_key("q"),
                                        presented=False))
    with pytest.raises(InvalidRequestError):
        t.run(lambda txn: locktable.renew(txn, hash_key("q"), None))


def test_a_restore_never_shows_beside_a_higher_lock_that_ran_out_unswept():
    """A sweep that lists only some expired records (a batch limit, another replica's listing
    made a moment earlier) must not restore a lock while a higher one that ran out is still in
    the table without its ``expired`` event (seen with two replicas on Redis)."""
    t = Table()
    for names, lock_type, key, timeout in ((["a.y"], LockType.MANUAL_OPERATOR, "op", 5.0),
                                           (["a"], LockType.QUEUE_EXECUTING, "run", 50.0),
                                           (["a"], LockType.MAINTENANCE, "m", 5.0)):
        t.run(lambda txn, n=names, lt=lock_type, k=key, s=timeout: locktable.request(
            txn, req(n, lt, user=k, timeout=s), hash_key(k), presented=False))
    t.clock.advance(6)  # the operator's and maintenance's locks ran out; the sweep lists one
    _, events = t.run(lambda txn: locktable.expire(txn, [("a.y", hash_key("op"))]))
    assert [(e.action, e.device_name, e.lock.user_id) for e in events] == [
        (LockAction.EXPIRED, "a.y", "op"), (LockAction.EXPIRED, "a", "m"),
        (LockAction.RESTORED, "a", "run")]
