"""Manual-access guard: an ophyd device moved by hand (IPython, a script) takes part in the
coordination like a plan does.

::

    from bs_coordination.guard import ManualAccessGuard

    guard = ManualAccessGuard("http://localhost:60620", user_id="alice", reason="alignment")
    guard.protect(motor, det)      # their set() and their signals' put() now check first
    motor.set(1.5).wait()          # takes a MANUAL_OPERATOR lock on 'motor' (kept until released)
    guard.release(motor)           # or guard.close(): releases everything, unprotects everything

    with guard.holding(m1, m2):    # both locked together for the block, released after it
        m1.set(0).wait(); m2.set(0).wait()

Before each guarded write the guard asks the service who holds the device:

- our own ``MANUAL_OPERATOR`` lock is active: the write goes ahead (the lease is renewed when
  less than half of it is left);
- the device is free: in ``mode="acquire"`` (default) the guard takes the lock, in
  ``mode="require"`` it refuses (take the lock first with ``acquire``/``holding``);
- someone else holds it, or holds a component of it, or our lock was preempted (the queue's
  RunEngine or maintenance took the device): the write is refused with ``DeviceAccessRefused``
  (a ``LockConflictError``) that names the holder, their lock type, reason and lease.

Writes made by the RunEngine's own thread pass unchecked: a RunEngine coordinates its plans
itself (``bs_coordination.install``).

Preemption handshake: the guard's locks ask for it and the guard follows the service's event
stream. When a higher priority (maintenance, the queue) takes a device the guard holds, the
guard lets a write already in progress finish and only then acknowledges: the preemptor is
answered after that (or at the service's deadline, if this process is frozen). Every write
counts as in progress from before its check (which asks the service), so a write either
passed its check before the preemption and ends before the acknowledgement, or is checked
after it and refused, naming the preemptor.

The guard runs its client on a private event-loop thread, so it works the same in a plain
Python prompt, in IPython and in Jupyter (whose own loop is already running).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import CoordinationError, LockConflictError, LockNotFoundError
from bs_coordination.models import DeviceLock, LockHolder, LockStatus, LockType, PreemptionAck

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Name of the thread bluesky's RunEngine runs its event loop in.
RUN_ENGINE_THREAD = "bluesky-run-engine"
#: How long a write allowed through ``set`` may take to reach the signal's ``put`` (ophyd's
#: ``Signal.set`` puts from a thread of its own).
PUT_PASS_SECONDS = 5.0
#: Longest a preemption's acknowledgement waits for a write in progress (the service's own
#: deadline answers the preemptor long before).
WRITE_WAIT_SECONDS = 60.0


class DeviceAccessRefused(LockConflictError):
    """A guarded write was refused: the device is held by someone else (named in the message
    and in ``conflicts``), or, in ``require`` mode, not locked by this guard."""


def describe(lock: LockHolder) -> str:
    """``'m1' is held by queue_server (QUEUE_EXECUTING, plan 42) since 12:00:01 UTC until ...``."""
    plan = f", plan {lock.plan_uid}" if lock.plan_uid else ""
    until = (f"until {lock.expires_at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
             if lock.expires_at else "with no expiry")
    reason = f", reason: {lock.reason!r}" if lock.reason else ""
    return (f"{lock.device_name!r} is held by {lock.user_id} ({lock.lock_type.value}{plan}) "
            f"since {lock.acquired_at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC {until}{reason}")


@dataclass
class _Held:
    """A lock this guard holds: its key and what identifies its record in a status."""

    device_name: str
    lock_key: str
    user_id: str
    acquired_at: datetime
    expires_at: datetime | None

    def matches(self, lock: DeviceLock | None) -> bool:
        # Device, holder and acquisition time survive preemption, restore, renew and upgrade.
        return (lock is not None and lock.device_name == self.device_name
                and lock.user_id == self.user_id and lock.acquired_at == self.acquired_at)


class _LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bs-coordination-guard",
                                       daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def root_name(obj: Any) -> str:
    """The name a plan would lock for ``obj``: its root device's name."""
    root = getattr(obj, "root", None) or obj
    name = getattr(root, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{obj!r} has no name: the guard locks devices by name")
    return name


class ManualAccessGuard:
    """Make ophyd devices' writes take (or require) a ``MANUAL_OPERATOR`` lock; see the module
    docstring. Use ``close()`` (or ``with``) to release every lock and restore the devices."""

    def __init__(
        self,
        url: str = "http://localhost:60620",
        user_id: str = "operator",
        *,
        reason: str | None = "manual access",
        lease: float | None = 600.0,
        mode: Literal["acquire", "require"] = "acquire",
        api_key: str | None = None,
        timeout: float = 10.0,
        exempt_threads: tuple[str, ...] = (RUN_ENGINE_THREAD,),
    ) -> None:
        if mode not in ("acquire", "require"):
            raise ValueError(f"mode: 'acquire' or 'require', got {mode!r}")
        self.url = url
        self.user_id = user_id
        self.reason = reason
        self.lease = lease
        self.mode = mode
        self.timeout = timeout
        self.exempt_threads = exempt_threads
        self._portal = _LoopThread()
        self._client = DeviceCoordinationClient(url, timeout=timeout, api_key=api_key)
        self._held: dict[str, _Held] = {}
        self._lock = threading.RLock()
        self._protected: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._passes: dict[int, list[float]] = {}
        self._local = threading.local()
        # The preemption handshake: guarded writes in progress, by device (never held across
        # I/O: an acknowledgement waits on it in an executor thread).
        self._writes = threading.Condition()
        self._in_progress: dict[str, int] = {}
        self._monitoring = False

    def __repr__(self) -> str:
        return f"<ManualAccessGuard {self.url} user={self.user_id} mode={self.mode} holds={sorted(self._held)}>"

    def __enter__(self) -> ManualAccessGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._portal.call(coro, self.timeout + 5.0)

    # -- explicit locks -------------------------------------------------------------------
    def acquire(self, *devices: Any) -> str:
        """Lock ``devices`` (objects or names) together, all or none; returns the lock key.

        ``DeviceAccessRefused`` names the holders when any of them is taken."""
        names = sorted({d if isinstance(d, str) else root_name(d) for d in devices})
        if not names:
            raise ValueError("name at least one device")
        with self._lock:
            if all(n in self._held for n in names):
                return self._held[names[0]].lock_key
            names = [n for n in names if n not in self._held]
            if not self._monitoring:
                self._call(self._start_monitoring())  # before the grant: no preemption missed
            response = self._call(self._client.request_locks(
                names, LockType.MANUAL_OPERATOR, self.user_id, timeout=self.lease, reason=self.reason,
                acknowledge_preemption=True))
            if not response.success or not response.lock_key:
                raise DeviceAccessRefused(
                    "refused: " + "; ".join(describe(c) for c in response.conflicts) if response.conflicts
                    else f"refused: {response.message}", response.conflicts)
            for lock in response.locks:
                self._held[lock.device_name] = _Held(lock.device_name, response.lock_key, lock.user_id,
                                                     lock.acquired_at, lock.expires_at)
            log.info("%s holds %s (MANUAL_OPERATOR)", self.user_id, ", ".join(names))
            return response.lock_key

    def release(self, *devices: Any) -> None:
        """Release this guard's locks on ``devices`` (all of its locks when none is named)."""
        with self._lock:
            names = ([d if isinstance(d, str) else root_name(d) for d in devices] if devices
                     else list(self._held))
            for name in names:
                held = self._held.pop(name, None)
                if held is None:
                    continue
                try:
                    self._call(self._client.release_lock(name, held.lock_key, self.user_id))
                except LockNotFoundError:
                    pass  # it expired or was force-released: nothing left to give back

    @contextlib.contextmanager
    def holding(self, *devices: Any) -> Iterator[str]:
        """Hold ``devices`` for the block (taken together, released after it, also on error)."""
        key = self.acquire(*devices)
        try:
            yield key
        finally:
            self.release(*devices)

    @property
    def held(self) -> list[str]:
        """Names of the devices this guard holds a lock on."""
        return sorted(self._held)

    # -- the check ------------------------------------------------------------------------
    def check(self, obj: Any) -> None:
        """Make sure this guard may write to ``obj`` now (taking the lock in ``acquire`` mode);
        ``DeviceAccessRefused`` otherwise. Called before every guarded write."""
        name = root_name(obj)
        with self._lock:
            status: LockStatus = self._call(self._client.get_lock_status(name))
            mine = self._held.get(name)
            blockers = [lk for lk in [status.lock, *status.component_locks]
                        if lk is not None and lk.is_active and not (mine and mine.matches(lk))]
            if blockers:
                waiting = mine is not None and any(mine.matches(p) for p in status.preempted)
                note = " (your MANUAL_OPERATOR lock waits under it)" if waiting else ""
                raise DeviceAccessRefused(
                    f"{self.user_id} may not move {name!r} now: {describe(blockers[0])}{note}", blockers)
            if mine is not None and mine.matches(status.lock):
                self._renew_if_due(mine)
                return
            if mine is not None:  # expired or force-released meanwhile
                self._held.pop(name, None)
            if self.mode == "require":
                raise DeviceAccessRefused(
                    f"{self.user_id} may not move {name!r}: it is not locked by you "
                    "(take it first: guard.acquire(device) or guard.holding(device))")
            self.acquire(name)

    # -- the preemption handshake (the client loop) -------------------------------------
    async def _start_monitoring(self) -> None:
        self._client.add_lock_update_callback(self._on_update)
        await self._client.start_websocket_monitoring()
        self._monitoring = True

    def _on_update(self, device_name: str, lock: DeviceLock, action: str) -> None:
        held = self._held.get(lock.device_name)
        if held is None or not held.matches(lock):
            return
        name = lock.device_name
        if action == "preempted":
            if lock.preemption_ack is PreemptionAck.PENDING:
                log.warning("%s: %r was preempted (%s); acknowledging once the write in "
                            "progress ends", self.user_id, name,
                            describe(lock.preempted_by) if lock.preempted_by else "a higher priority")
                asyncio.get_running_loop().create_task(self._acknowledge(name, held.lock_key))

    async def _acknowledge(self, name: str, lock_key: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._wait_for_writes, name)
        try:
            await self._client.acknowledge_preemption(lock_key, name)
        except CoordinationError as exc:
            log.warning("could not acknowledge the preemption of %r: %s", name, exc.message)

    def _wait_for_writes(self, name: str) -> None:
        with self._writes:
            self._writes.wait_for(lambda: not self._in_progress.get(name), timeout=WRITE_WAIT_SECONDS)

    def _renew_if_due(self, held: _Held) -> None:
        if held.expires_at is None or self.lease is None:
            return
        left = (held.expires_at - datetime.now(timezone.utc)).total_seconds()
        if left < self.lease / 2:
            renewed = self._call(self._client.renew_lock(held.lock_key, self.lease))
            for h in self._held.values():
                if h.lock_key == held.lock_key:
                    h.expires_at = renewed.expires_at

    # -- wrapping devices -----------------------------------------------------------------
    def protect(self, *objs: Any) -> None:
        """Guard the writes of ``objs`` (ophyd devices or signals): ``set`` of each, and ``put``
        and ``set`` of every writable signal they contain."""
        for obj in objs:
            root_name(obj)  # fail now, not at the first move, if it cannot be locked
            targets = [obj]
            walk = getattr(obj, "walk_signals", None)
            if callable(walk):
                targets += [item.item for item in walk(include_lazy=False)]
            for target in targets:
                if id(target) in self._protected:
                    continue
                originals: dict[str, Any] = {}
                for method in ("set", "put"):
                    if method == "put" and target is not obj and not getattr(target, "write_access", True):
                        continue
                    original = getattr(target, method, None)
                    if not callable(original):
                        continue
                    originals[method] = target.__dict__.get(method, _ABSENT)
                    setattr(target, method, self._wrap(target, method, original))
                self._protected[id(target)] = (target, originals)

    def unprotect(self, *objs: Any) -> None:
        """Give ``objs`` (all protected objects when none is named) their own methods back."""
        wanted = None if not objs else {id(o) for o in objs}
        for key, (target, originals) in list(self._protected.items()):
            root = getattr(target, "root", target)
            if wanted is not None and key not in wanted and id(root) not in wanted:
                continue
            for method, before in originals.items():
                if before is _ABSENT:
                    with contextlib.suppress(AttributeError):
                        delattr(target, method)
                else:
                    setattr(target, method, before)
            del self._protected[key]

    def _wrap(self, target: Any, method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        guard = self

        @functools.wraps(original)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            name = None
            if not guard._permitted_without_check(target, method):
                name = root_name(target)
                guard._begin_write(name)  # counted before the check: see the module docstring
                try:
                    guard.check(target)
                except BaseException:
                    guard._end_write(name)
                    raise
            try:
                if method == "set":
                    # ophyd's Signal.set puts from its own thread: let that one put through.
                    guard._passes.setdefault(id(target), []).append(
                        time.monotonic() + PUT_PASS_SECONDS)
                depth = getattr(guard._local, "depth", 0)
                guard._local.depth = depth + 1  # writes nested in this one (same thread) are covered
                try:
                    return original(*args, **kwargs)
                finally:
                    guard._local.depth = depth
            finally:
                if name is not None:
                    guard._end_write(name)

        guarded.__bs_coordination_guard__ = True  # type: ignore[attr-defined]
        return guarded

    def _begin_write(self, name: str) -> None:
        with self._writes:
            self._in_progress[name] = self._in_progress.get(name, 0) + 1

    def _end_write(self, name: str) -> None:
        with self._writes:
            left = self._in_progress.get(name, 1) - 1
            if left:
                self._in_progress[name] = left
            else:
                self._in_progress.pop(name, None)
            self._writes.notify_all()

    def _permitted_without_check(self, target: Any, method: str) -> bool:
        if threading.current_thread().name in self.exempt_threads:
            return True
        if getattr(self._local, "depth", 0) > 0:
            return True
        if method == "put":
            passes = self._passes.get(id(target))
            now = time.monotonic()
            while passes:
                if passes.pop(0) > now:
                    return True
        return False

    def close(self) -> None:
        """Release every lock, restore every protected object, stop the client."""
        try:
            self.release()
        finally:
            self.unprotect()
            with contextlib.suppress(Exception):
                self._call(self._client.disconnect())
            self._portal.close()


_ABSENT = object()

__all__ = ["DeviceAccessRefused", "ManualAccessGuard", "describe", "root_name"]
