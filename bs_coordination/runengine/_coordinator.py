"""The RunEngine's side of the lock service: takes the plans' locks, renews them, follows
their fate and tells the suspender.

A ``PlanCoordinator`` owns one ``DeviceCoordinationClient`` running on its own daemon thread
with its own asyncio loop (``ClientThread``). Why a thread of its own and not ``RE.loop``:
the RunEngine loop is blocked by every synchronous device call a plan makes (ophyd ``read``,
``trigger``, ``set`` bodies), and while it is blocked nothing on it runs. Lease renewals and,
above all, the preemption events that must suspend the RunEngine would wait behind the plan
they are meant to interrupt. On its own loop the client keeps renewing and listening whatever
the plan does; the RunEngine loop only *awaits* lock requests through
``asyncio.wrap_future(asyncio.run_coroutine_threadsafe(...))`` and is never blocked by them.

Threads: ``PlanLocks.held``, the ``LockTracker`` and the listeners' notifications change only
on the client thread (answers and events both arrive there, in order).
``PlanLocks.covered`` (objects whose device is locked) is read and filled on the RunEngine
thread (by ``install``'s guarded commands, or the plan wrapper); the client thread only removes
entries (a lock preempted or lost), so the next message touching that device asks again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import (
    CoordinationError,
    LockConflictError,
    LockNotFoundError,
    ServiceError,
)
from bs_coordination.models import DeviceLock, LockState, LockType, PreemptionAck, names_overlap
from bs_coordination.runengine._client_thread import ClientThread, describe_lock, queue_item_uid
from bs_coordination.runengine._tracker import LockTracker, PlanLocks
from bs_coordination.runengine.suspender import LockPreemptedSuspender

log = logging.getLogger(__name__)

#: ``listener(preempted, offline)``: the running plan's preempted locks by device, and why the
#: event stream is down while a plan runs (``None`` when it is up or no plan runs).
PreemptionListener = Callable[[dict[str, DeviceLock], "str | None"], None]

#: How often the connection watchdog looks at the WebSocket (a local flag, no I/O).
_WATCHDOG_SECONDS = 0.1
#: How often a plan waiting for the event stream to come up looks again (a local flag).
_ONLINE_POLL_SECONDS = 0.005


class PlanCoordinator:
    """Takes ``QUEUE_EXECUTING`` locks for the plans of one RunEngine and follows their fate.

    ``install()`` creates one; ``coordinated_wrapper`` uses it. It runs the client (requests,
    lease heartbeats, WebSocket monitoring) on a ``ClientThread`` and tells its preemption
    listeners (the suspender) which of the running plan's devices are preempted.
    """

    def __init__(
        self,
        url: str = "http://localhost:60620",
        user_id: str = "queue_server",
        wait: float = 60.0,
        lease: float = 300.0,
        *,
        ws_url: str | None = None,
        api_key: str | None = None,
        reason: str | None = None,
        heartbeat: float | None = None,
        http_timeout: float = 30.0,
        plan_uid: Callable[[], str | None] | None = None,
    ) -> None:
        if lease is None or lease <= 0:
            raise ValueError("lease: QUEUE_EXECUTING locks need a lease > 0 seconds")
        if wait < 0:
            raise ValueError("wait: must be >= 0 seconds")
        self.url = url
        self.user_id = user_id
        self.wait = float(wait)
        self.lease = float(lease)
        self.reason = reason
        self.heartbeat = heartbeat
        self.http_timeout = http_timeout
        self.plan_uid_source = plan_uid or queue_item_uid
        self._client_args = dict(base_url=url, ws_url=ws_url, timeout=http_timeout,
                                 api_key=api_key)
        self._thread: ClientThread | None = None
        self.client: DeviceCoordinationClient | None = None
        self.tracker = LockTracker(user_id, self._notify)
        self._current: PlanLocks | None = None  # the session of the plan running now
        self._kept: list[str] = []  # keys of halted plans, left to their lease
        self._listeners: list[PreemptionListener] = []
        self._resume_hooks: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._monitor_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._online = False
        self._offline_reason: str | None = None  # as last told to the listeners
        # The service said its store lost its data (every lock gone): the running plan is
        # suspended until the table is read again, then asks for its locks anew.
        self._lost_reason: str | None = None
        #: Take the plans' locks with the preemption handshake (when a suspender listens, the
        #: one that says when the RunEngine has stopped: see ``add_preemption_listener``).
        self.acknowledge_preemption = True
        self._acknowledger = False  # a listening suspender acknowledges for us
        self._acked: set[tuple[str, int]] = set()  # (device, token) acknowledged (client thread)

    def __repr__(self) -> str:
        return f"<PlanCoordinator {self.url} user={self.user_id!r}>"

    # -- life cycle (any thread but the client thread) ---------------------------------
    def start(self) -> None:
        """Start the client thread and begin following lock events (in the background:
        a service that is down now does not stop a profile collection from loading)."""
        if self._thread is not None:
            return
        self._thread = ClientThread()
        self._thread.start()
        self._thread.call(self._start(), self.http_timeout)

    async def _start(self) -> None:
        self.client = DeviceCoordinationClient(**self._client_args)  # type: ignore[arg-type]
        self.client.add_lock_update_callback(self.tracker.on_event)
        self.client.add_status_callback(self.tracker.on_status)
        self.client.add_message_callback(self._on_message)
        self.client.add_status_callback(self._on_resync)
        loop = asyncio.get_running_loop()
        self._monitor_task = loop.create_task(self._keep_monitoring())
        self._watchdog_task = loop.create_task(self._watch_connection())

    async def _watch_connection(self) -> None:
        """A plan that cannot hear of preemptions must not go on touching devices: while the
        event stream is down during a plan, the listeners are told (the suspender suspends
        the RunEngine until it is back and resynchronised)."""
        assert self.client is not None
        while True:
            online = self.client.websocket_connected
            if online != self._online:
                self._online = online
                if online:
                    log.info("lock event stream from %s is up", self.url)
                else:
                    log.warning("lock event stream from %s is down; reconnecting", self.url)
                self._notify_if_changed()
            await asyncio.sleep(_WATCHDOG_SECONDS)

    def _offline(self) -> str | None:
        if not self.tracker.sessions:
            return None
        if self._lost_reason is not None:
            return (f"{self._lost_reason} The plan's locks are gone: it is suspended, and asks "
                    "for them again (new fencing tokens) before it touches a device.")
        if self._online:
            return None
        return (f"lost contact with the lock service at {self.url}: a preemption would go "
                "unnoticed; waiting for the event stream to reconnect")

    def _notify_if_changed(self) -> None:
        if self._offline() != self._offline_reason:
            self._notify()

    async def _keep_monitoring(self) -> None:
        """Start monitoring; retry until it starts (it reconnects by itself afterwards)."""
        delay = 0.5
        while True:
            try:
                await self._ensure_monitoring()
                return
            except CoordinationError as exc:
                log.warning("coordination service %s not reachable yet (%s); retrying in %.0f s",
                            self.url, exc.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _on_message(self, message: dict[str, Any]) -> None:
        """Client thread: a raw WebSocket message; ``store_data_lost`` suspends the plan."""
        if message.get("type") == "store_data_lost":
            self._lost_reason = str(message.get("message") or "the lock store lost its data.")
            log.error("coordination: %s", self._lost_reason)
            self._notify()

    def _on_resync(self, locks: list[DeviceLock]) -> None:
        """Client thread: a full status arrived (the tracker has dropped the lost locks)."""
        if self._lost_reason is not None:
            self._lost_reason = None
            self._notify()

    async def _ensure_monitoring(self) -> None:
        assert self.client is not None
        if not self.client.monitoring:
            await self.client.start_websocket_monitoring()

    def close(self) -> None:
        """Stop heartbeats and monitoring and end the client thread. Locks still held by a
        running plan are left to their lease."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            thread.call(self._close(), self.http_timeout)
        except Exception:
            log.exception("closing the coordination client failed")
        thread.stop()

    async def _close(self) -> None:
        for task in (self._monitor_task, self._watchdog_task):
            if task is not None:
                task.cancel()
        for session in list(self.tracker.sessions.values()):
            await self._forget(session)
        if self.client is not None:
            await self.client.disconnect()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def add_preemption_listener(self, listener: PreemptionListener) -> None:
        """``listener(preempted, offline)`` is called on the client thread with a copy of
        ``{device_name: our preempted lock}`` and the offline reason (``None``: the event
        stream is up, or no plan runs) every time either changes.

        A ``LockPreemptedSuspender``'s ``update`` is also the party of the preemption
        handshake: it is given ``acknowledge_preemptions`` and calls it once the RunEngine has
        suspended, and the plans' locks are taken asking for the handshake."""
        self._listeners.append(listener)
        owner = getattr(listener, "__self__", None)
        if isinstance(owner, LockPreemptedSuspender):
            owner.acknowledge = self.acknowledge_preemptions
            self._acknowledger = True

    def acknowledge_preemptions(self) -> None:
        """Any thread: the RunEngine has stopped using its devices (suspended, movers
        stopped): acknowledge every preemption of the plans' locks that waits for it, so
        maintenance is answered now. Returns at once (the requests run on the client
        thread)."""
        thread = self._thread
        if thread is not None:
            thread.submit(self._acknowledge()).add_done_callback(_log_failure)

    async def _acknowledge(self) -> None:
        assert self.client is not None
        due_keys: list[str] = []
        live: set[tuple[str, int]] = set()
        for session in list(self.tracker.sessions.values()):
            key = session._key
            due = False
            for name, lock in session.held.items():
                if lock.state is LockState.PREEMPTED:
                    live.add((name, lock.token))
                    if lock.preemption_ack is PreemptionAck.PENDING \
                            and (name, lock.token) not in self._acked:
                        self._acked.add((name, lock.token))
                        due = True
            if due and key is not None:
                due_keys.append(key)
        self._acked &= live  # forget locks restored or gone
        for key in due_keys:
            try:
                answer = await self.client.acknowledge_preemption(key)
            except CoordinationError as exc:
                log.warning("could not acknowledge the preemption of the plan's locks (%s); "
                            "maintenance is answered at the service's deadline", exc.message)
                continue
            names = ", ".join(repr(lk.device_name) for lk in answer.acknowledged)
            log.info("acknowledged the preemption of %s: the RunEngine is suspended",
                     names or "nothing (already answered)")

    def add_resume_hook(self, hook: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """``await hook()`` runs on the RunEngine loop whenever the RunEngine resumes a plan
        (after a pause or a suspension)."""
        self._resume_hooks.append(hook)

    # -- resuming after a pause -------------------------------------------------------------
    # ``install``'s state hook sees the RunEngine go from paused to running and awaits
    # ``resume()`` before the next message runs; ``coordinated_wrapper``'s lock messages carry
    # the coordinator as ``msg.obj``, so the RunEngine calls ``pause()``/``resume()`` on it as
    # on any Pausable object it has seen. That is the moment a suspension requested while the
    # RunEngine was paused can be re-requested: after it rewound, before it runs a message.
    def pause(self) -> None:
        """Nothing to do when the RunEngine pauses (locks are kept)."""

    async def resume(self) -> None:
        for hook in list(self._resume_hooks):
            await hook()

    # -- plans (RunEngine thread) ---------------------------------------------------------
    def open_session(self, *, plan_uid: str | None = None, reason: str | None = None,
                     wait: float | None = None, new: bool = False) -> tuple[PlanLocks, bool]:
        """RunEngine thread: the locks of a starting plan, and whether the caller owns them.

        A plan wrapped twice (a ``coordinated_decorator`` plan run by a RunEngine that also
        coordinates every plan) shares the outer plan's locks: a second key of the same
        user would conflict with the first. Only the owner closes the session.
        ``new``: the RunEngine is idle and a plan is about to start, so a session still open
        belongs to no running plan (a plan built but never run): it is closed first."""
        if self._thread is None:
            raise CoordinationError("the plan coordinator is not running (uninstalled?)")
        current = self._current
        if current is not None and not current.closed:
            if not new:
                return current, False
            log.warning("closing the locks of %r: its plan is not running", current)
            self.close_session(current)
        if plan_uid is None:
            try:
                plan_uid = self.plan_uid_source()
            except Exception:
                log.exception("plan_uid source failed; locking without a plan_uid")
        self._current = PlanLocks(plan_uid=plan_uid, reason=reason or self.reason,
                                  wait=self.wait if wait is None else float(wait))
        return self._current, True

    async def acquire(self, session: PlanLocks, names: Iterable[str]) -> None:
        """On the RunEngine loop: hold ``names`` (active) for ``session``, or raise.

        The request runs on the client loop and is shielded: a RunEngine suspension cancels
        this await, but not the request, whose grant is recorded (or released if the plan has
        ended by then). The message asks again when the RunEngine replays it (or, for a lock
        message, when the plan sends it again) after the suspension.
        """
        thread = self._thread
        if thread is None:
            raise CoordinationError("the plan coordinator is not running (uninstalled?)")
        fut = thread.submit(self._acquire(session, tuple(names)))
        await asyncio.shield(asyncio.wrap_future(fut))

    def close_session(self, session: PlanLocks, *, release: bool = True) -> None:
        """Any thread: the plan ended. Release its locks (``release``) or leave them to their
        lease (a halt), stop its heartbeat and stop watching them."""
        session.closed = True
        thread = self._thread
        if thread is None:
            return
        fut = thread.submit(self._end(session, release))
        if thread.on_thread:
            return
        try:
            fut.result(self.http_timeout)
        except CoordinationError as exc:
            log.warning("could not release the locks of %r (%s); they expire with their lease",
                        session, exc.message)
        except Exception:
            log.exception("could not release the locks of %r; they expire with their lease",
                          session)

    # -- client thread ------------------------------------------------------------------
    async def _acquire(self, session: PlanLocks, names: tuple[str, ...]) -> None:
        if session._alock is None:
            session._alock = asyncio.Lock()
            session._changed = asyncio.Event()
        async with session._alock:
            if session.closed:
                raise CoordinationError("the plan has ended; no more locks are taken for it")
            if session.id not in self.tracker.sessions:
                await self._ensure_online()
                self.tracker.open(session)
                self._notify_if_changed()
            want = [n for n in dict.fromkeys(names) if n not in session.held]
            if want:
                await self._request(session, want)
            await self._wait_active(session, names)

    async def _ensure_online(self) -> None:
        """No plan without the event stream: a plan that cannot hear of a preemption must not
        start (fail closed). Waits up to the HTTP timeout for a reconnect under way."""
        assert self.client is not None
        try:
            await self._ensure_monitoring()
            deadline = asyncio.get_running_loop().time() + self.http_timeout
            while not self.client.websocket_connected:
                if asyncio.get_running_loop().time() > deadline:
                    raise ServiceError(f"no event stream after {self.http_timeout:g} s")
                # A plan waits here for the stream a fresh install() is still opening: look
                # often, or every first plan pays up to the watchdog's period.
                await asyncio.sleep(_ONLINE_POLL_SECONDS)
        except CoordinationError as exc:
            raise ServiceError(
                f"cannot follow lock events from {self.url} ({exc.message}); "
                "refusing to run the plan without preemption monitoring") from exc
        self._online = True

    async def _request(self, session: PlanLocks, want: list[str]) -> None:
        assert self.client is not None
        wait = 0.0 if session.failed else session.wait
        # A key that holds nothing any more (every lock of the plan expired, was
        # force-released, or the store lost its data) cannot be added to: start a new one.
        key = session._key if session.held else None
        if key is None and session._keeper is not None:
            keeper, session._keeper = session._keeper, None
            await keeper.stop()
        response = await self.client.request_locks(
            want, LockType.QUEUE_EXECUTING, self.user_id, timeout=self.lease,
            reason=session.reason, plan_uid=session.plan_uid, wait=wait, lock_key=key,
            acknowledge_preemption=self.acknowledge_preemption and self._acknowledger)
        if not response.success:
            session.failed = True
            err = self._conflict_error(want, response.message, response.conflicts, wait)
            blocked = [n for n in want if any(names_overlap(n, c.device_name)
                                                for c in response.conflicts)] or want
            for n in blocked:
                session.refused[n] = err
            raise err
        if key is None:
            session._key = response.lock_key
        if session.closed:
            # The plan ended while this request waited: give the grant straight back.
            await self._release_key(session, response.lock_key)
            raise CoordinationError("the plan ended while its lock request was waiting")
        for lock in response.locks:
            if lock.user_id != self.tracker.user_id:
                # With API keys on, the service records the key's principal, whatever user_id
                # we sent: follow the locks under the name they really carry.
                log.info("the service holds our locks as %r (not %r): the API key's principal",
                         lock.user_id, self.tracker.user_id)
                self.tracker.user_id = lock.user_id
            self.tracker.track(session, lock)
        if session._keeper is None and session._key is not None:
            assert self.client is not None
            session._keeper = self.client.keep_alive(session._key, self.lease, self.heartbeat)

    def _conflict_error(self, want: list[str], message: str, conflicts: list[DeviceLock],
                        wait: float) -> LockConflictError:
        if conflicts:
            holders = "; ".join(describe_lock(c) for c in conflicts[:3])
            more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
            text = f"could not lock {', '.join(map(repr, want))}"
            text += f" within {wait:g} s" if wait else ""
            text += f": {holders}{more}"
        else:
            text = f"could not lock {', '.join(map(repr, want))}: {message}"
        return LockConflictError(text, conflicts)

    async def _wait_active(self, session: PlanLocks, names: tuple[str, ...]) -> None:
        """Wait while one of ``names`` is preempted (the suspender is suspending the RunEngine
        meanwhile); fail if one of them was lost."""
        assert session._changed is not None
        while True:
            if session.closed:
                raise CoordinationError("the plan has ended")
            missing = [n for n in names if n not in session.held]
            if missing:
                raise CoordinationError(
                    f"the lock on {missing[0]!r} was lost (expired or force-released)")
            if not any(session.held[n].state is LockState.PREEMPTED for n in names):
                return
            session._changed.clear()
            await session._changed.wait()

    async def _end(self, session: PlanLocks, release: bool) -> None:
        key = session._key
        await self._forget(session)
        if key is None:
            return
        if release:
            await self._release_key(session, key)
        else:
            self._kept.append(key)
            log.warning("the halted plan's locks on %s are kept until their lease runs out "
                        "(release_kept() frees them now)", ", ".join(map(repr, session.held)))

    def release_kept(self) -> None:
        """Release now the locks of halted plans (kept, by design, until their lease ends):
        once someone has made sure the devices are safe to use."""
        thread = self._thread
        if thread is not None:
            thread.call(self._release_kept(), self.http_timeout)

    async def _release_kept(self) -> None:
        kept, self._kept = self._kept, []
        for key in kept:
            await self._release_key(None, key)

    async def _release_key(self, session: PlanLocks | None, key: str | None) -> None:
        if key is None or self.client is None:
            return
        try:
            await self.client.release_lock(None, key, self.user_id)
        except LockNotFoundError:
            pass  # nothing left under the key (expired, force-released)

    async def _forget(self, session: PlanLocks) -> None:
        keeper, session._keeper = session._keeper, None
        if keeper is not None:
            await keeper.stop()
        if self.tracker.forget(session):
            self._notify_if_changed()  # no plan left: being offline no longer matters

    def _notify(self) -> None:
        snapshot = dict(self.tracker.preempted)
        self._offline_reason = offline = self._offline()
        for listener in list(self._listeners):
            try:
                listener(snapshot, offline)
            except Exception:
                log.exception("preemption listener %r failed", listener)


def _log_failure(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("acknowledging a preemption failed", exc_info=fut.exception())


__all__ = ["PlanCoordinator", "PreemptionListener"]
