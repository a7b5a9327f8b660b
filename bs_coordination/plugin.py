"""``install(RE, ...)``: device coordination for a RunEngine, in one call from startup code.

::

    # profile_collection/startup/10-coordination.py
    from bluesky import RunEngine
    from bs_coordination import install

    RE = RunEngine({})
    coordination = install(RE, url="http://localhost:60620", user_id="queue_server")

From then on every plan run by ``RE`` holds ``QUEUE_EXECUTING`` locks on the devices it
touches, releases them when it ends, and suspends while maintenance has taken one of them.
``install`` returns a ``CoordinationHandle``; ``handle.uninstall()`` undoes it. Calling
``install`` again on the same RunEngine (a queue-server script upload re-runs startup code)
replaces the first installation instead of adding a second one.

How, without wrapping the plan generator (every generator frame between the RunEngine and
the plan makes each bluesky plan stub call dearer: see ``plans.py``):

- the preprocessor (last in ``RE.preprocessors``) opens the plan's session and hands the
  RunEngine the plan itself behind one ``coordination_lock`` message: the devices known up
  front, in one atomic request, before the plan's first step;
- the RunEngine's device commands (``set``, ``read``, ``trigger``, ``stage``, ... and any
  command registered before ``install``, except those that never carry a device) are
  re-registered wrapped: a message whose object is not yet covered by a held lock awaits the
  lock inside the RunEngine loop before the original command runs (``args`` too for
  ``collect``/``locate``); once covered, one set lookup;
- the plan's session ends when the RunEngine goes back to idle (``RE.state_hook``, chained
  to any hook already there): locks released after a normal end, an exception, a stop or an
  abort; after a halt (or a panic) they are left to expire with their lease.

bluesky has no public getter for a registered command, so the wrapped originals are read
from ``RE._command_registry`` (bluesky 1.15); a RunEngine without it gets the wrapping
preprocessor (``coordinated_wrapper``) instead.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from typing import Any

from bluesky.utils import Msg

from bs_coordination._re_coordinator import PlanCoordinator
from bs_coordination._re_tracker import PlanLocks
from bs_coordination.plans import (
    GRANTED,
    LOCK_COMMAND,
    CoordinatedPreprocessor,
    coordinated_wrapper,
    lock_command,
    lock_message_devices,
    start_coordinated,
)
from bs_coordination.suspender import LockPreemptedSuspender

log = logging.getLogger(__name__)

_HANDLES: weakref.WeakKeyDictionary[Any, CoordinationHandle] = weakref.WeakKeyDictionary()

Command = Callable[[Msg], Coroutine[Any, Any, Any]]

#: RunEngine commands whose messages never carry a device (not wrapped: no cost on them).
#: ``declare_stream`` names devices in ``args`` but only describes them.
_NO_DEVICE_COMMANDS = frozenset({
    "RE_class", "_resume_from_suspender", "_start_suspender", "checkpoint", "clear_checkpoint",
    "close_run", "create", "declare_stream", "drop", "input", "install_suspender", "null",
    "open_run", "pause", "remove_suspender", "rewindable", "save", "sleep", "subscribe",
    "unsubscribe", "wait", "wait_for", LOCK_COMMAND,
})
#: Commands that carry further devices in ``msg.args``.
_ARGS_COMMANDS = frozenset({"collect", "locate"})
#: Attribute naming the original of a wrapped command (and the previous hook of ours).
_ORIGINAL = "_bs_coordination_original"


def _command_registry(RE: Any) -> dict[str, Command] | None:
    """The RunEngine's commands by name (bluesky offers no public getter for one)."""
    registry = getattr(RE, "_command_registry", None)
    return registry if isinstance(registry, dict) else None


def _unwrapped(fn: Any) -> Any:
    """``fn`` without the wrappers of a coordination installed earlier (and lost); ``None``
    for a state hook of ours that had no hook before it."""
    for _ in range(100):
        if not hasattr(fn, _ORIGINAL):
            break
        fn = getattr(fn, _ORIGINAL)
    return fn


class _LockedStart:
    """The plan as ``install``'s preprocessor hands it to the RunEngine: first one
    ``coordination_lock`` message for the devices known up front, then the plan itself.

    Once the lock is granted, ``send``/``throw``/``close`` *are* the plan generator's own
    bound methods (instance slots, looked up before anything on the class), so the RunEngine
    drives the plan directly and no frame of ours sits on the stack while the plan runs.
    (Only a preprocessor appended after ours, delegating with ``yield from``, goes through
    ``__next__``: one Python call per message.)
    """

    __slots__ = ("_msg", "_plan", "close", "send", "throw")

    def __init__(self, plan: Generator[Msg, Any, Any], msg: Msg) -> None:
        self._plan = plan
        self._msg = msg
        self.send: Callable[[Any], Msg] = self._send_first
        self.throw: Callable[..., Msg] = plan.throw  # before the grant: ends the unstarted plan
        self.close: Callable[[], None] = plan.close

    def _send_first(self, reply: Any) -> Msg:
        if reply is GRANTED:
            plan = self._plan
            self.send = plan.send
            return plan.send(None)
        # The first step, or a suspension cancelled the lock command (None): ask (again).
        return self._msg

    def __iter__(self) -> _LockedStart:
        return self

    def __next__(self) -> Msg:
        return self.send(None)

    def __repr__(self) -> str:
        return f"<locked start of {self._plan!r}>"


def _fail(exc: BaseException) -> Generator[Msg, Any, Any]:
    raise exc
    yield  # a generator


class RunEngineHooks:
    """What ``install`` puts into the RunEngine's dispatch: the guarded device commands, the
    ``coordination_lock`` command and the state hook that ends a plan's session.

    ``session``/``covered``: the running plan's locks and the objects they cover (``None``
    when no plan runs, or when the preprocessor is not in ``RE.preprocessors``: then the
    commands check nothing). Set on the caller's thread when ``RE(plan)`` applies the
    preprocessor, cleared on the RunEngine thread when the RunEngine goes idle.
    """

    def __init__(self, RE: Any, coordinator: PlanCoordinator) -> None:
        self.RE = RE
        self.coordinator = coordinator
        self.session: PlanLocks | None = None
        self.covered: set[Any] | None = None
        self._originals: dict[str, Command] = {}
        self._state_hook: Callable[[str, str], None] | None = None
        self.attached = False

    @staticmethod
    def supported(RE: Any) -> bool:
        return _command_registry(RE) is not None and hasattr(RE, "state_hook")

    # -- install / uninstall ------------------------------------------------------------------
    def attach(self) -> None:
        RE = self.RE
        registry = _command_registry(RE)
        assert registry is not None
        for name, fn in list(registry.items()):
            if name in _NO_DEVICE_COMMANDS:
                continue
            original = _unwrapped(fn)
            self._originals[name] = original
            RE.register_command(name, self._guarded(original, name in _ARGS_COMMANDS))
        RE.register_command(LOCK_COMMAND, lock_command)
        self._chain_state_hook()
        self.attached = True

    def detach(self) -> None:
        """Put the original commands and state hook back (a plan still running keeps its
        locks until their lease ends)."""
        if not self.attached:
            return
        self.attached = False
        RE = self.RE
        registry = _command_registry(RE) or {}
        for name, original in self._originals.items():
            if getattr(registry.get(name), _ORIGINAL, None) is original:
                RE.register_command(name, original)
        if LOCK_COMMAND in registry:
            RE.unregister_command(LOCK_COMMAND)
        hook = self._state_hook
        if hook is not None and RE.state_hook is hook:
            RE.state_hook = getattr(hook, _ORIGINAL, None)
        # else another hook wraps ours: ours stays in the chain, inert (not attached).
        self.session = self.covered = None

    def _chain_state_hook(self) -> None:
        previous = _unwrapped(self.RE.state_hook)

        def state_hook(new: str, old: str) -> None:
            if self.attached and new in ("idle", "panicked"):
                # halting -> idle: a halt skips cleanup, so do we (the lease frees them).
                self.end_plan(release=old != "halting" and new != "panicked")
            if previous is not None:
                previous(new, old)

        setattr(state_hook, _ORIGINAL, previous)
        self._state_hook = state_hook
        self.RE.state_hook = state_hook

    # -- plans ----------------------------------------------------------------------------------
    def start_plan(self, plan: Iterable[Msg]) -> Iterator[Msg]:
        """The preprocessor's work (caller's thread, RunEngine idle): a new session and the
        plan behind its up-front lock message."""
        if not self.RE.state.is_idle:
            # Not called by RE(plan) (which refuses a busy RunEngine) but by hand, mid-plan:
            # wrap it, so that it shares the running plan's locks and ends nothing.
            return coordinated_wrapper(plan, self.coordinator)
        self.end_plan(release=True)  # a session left by a plan that never ran
        if self.RE.state_hook is not self._state_hook:
            # Someone replaced the hook: without it the locks would outlive the plan.
            log.warning("RE.state_hook was replaced after install(); chaining it again")
            self._chain_state_hook()
        try:
            session, gen, lock_msg = start_coordinated(plan, self.coordinator)
        except Exception as exc:  # e.g. an unnamed device, an uninstalled coordinator
            return _fail(exc)  # the RunEngine runs it and fails the plan as usual
        self.session, self.covered = session, session.covered
        return _LockedStart(gen, lock_msg)

    def end_plan(self, *, release: bool) -> None:
        session, self.session, self.covered = self.session, None, None
        if session is not None and not session.closed:
            try:
                self.coordinator.close_session(session, release=release)
            except Exception:  # never into the RunEngine's state machine
                log.exception("ending the locks of %r failed; they expire with their lease",
                              session)

    async def _lock(self, msg: Msg) -> None:
        session = self.session
        if session is not None:
            await lock_message_devices(self.coordinator, session, msg)

    def _guarded(self, original: Command, carries_args: bool) -> Command:
        """``original`` preceded by the lock check of the running plan. The fast path (the
        object is covered) is one attribute read and one set lookup."""
        hooks = self
        lock = self._lock

        if carries_args:
            async def command(msg: Msg) -> Any:
                if hooks.covered is not None:
                    await lock(msg)
                return await original(msg)
        else:
            async def command(msg: Msg) -> Any:
                covered = hooks.covered
                if covered is not None:
                    obj = msg.obj
                    if obj is not None:
                        try:
                            known = obj in covered
                        except TypeError:  # unhashable: not a device
                            known = True
                        if not known:
                            await lock(msg)
                return await original(msg)

        command.__doc__ = original.__doc__  # RE.print_command_registry() shows it
        setattr(command, _ORIGINAL, original)
        return command


class CoordinationHandle:
    """What ``install()`` put into a RunEngine; ``uninstall()`` takes it out again."""

    def __init__(self, RE: Any, coordinator: PlanCoordinator, suspender: LockPreemptedSuspender,
                 preprocessor: CoordinatedPreprocessor,
                 hooks: RunEngineHooks | None = None) -> None:
        self.RE = RE
        self.coordinator = coordinator
        self.suspender = suspender
        self.preprocessor = preprocessor
        self.hooks = hooks
        self.installed = True

    def __repr__(self) -> str:
        state = "installed" if self.installed else "uninstalled"
        return f"<CoordinationHandle {self.coordinator!r} {state}>"

    @property
    def user_id(self) -> str:
        return self.coordinator.user_id

    def release_kept(self) -> None:
        """Release the locks a halted plan kept (a halt leaves them to their lease, so that
        nobody moves the devices before someone has looked at them)."""
        self.coordinator.release_kept()

    def uninstall(self) -> None:
        """Remove the preprocessor, the suspender and the commands (the originals come back),
        and stop the client. Locks held by a plan still running are left to their lease."""
        if not self.installed:
            return
        self.installed = False
        RE = self.RE
        RE.preprocessors[:] = [p for p in RE.preprocessors if p is not self.preprocessor]
        if self.suspender in RE.suspenders:
            RE.remove_suspender(self.suspender)
        if self.hooks is not None:
            self.hooks.detach()
        elif LOCK_COMMAND in RE.commands and not _others(RE, self):
            RE.unregister_command(LOCK_COMMAND)
        self.coordinator.close()
        if _HANDLES.get(RE) is self:
            del _HANDLES[RE]
        log.info("device coordination uninstalled from %r", RE)


def _others(RE: Any, handle: CoordinationHandle) -> bool:
    other = _HANDLES.get(RE)
    return other is not None and other is not handle and other.installed


def install(
    RE: Any,
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
) -> CoordinationHandle:
    """Make every plan run by ``RE`` take part in device coordination.

    - ``url`` / ``ws_url``: the lock service (``ws_url`` default: ``url`` with ``/ws``);
    - ``user_id``: who the locks belong to; ``api_key``: when the service requires keys;
    - ``wait``: seconds a plan waits for a device someone else holds before it fails with an
      error naming the device, the holder, the lock type and the reason;
    - ``lease``: lease of the plan's locks in seconds, renewed every ``heartbeat`` seconds
      (default ``lease / 3``) while the plan runs; a halted or killed RunEngine loses them
      when the lease runs out (``handle.release_kept()`` frees a halted plan's locks now);
    - ``reason``: the reason shown with the locks (default: the plan's name);
    - ``plan_uid``: a callable giving the ``plan_uid`` of a starting plan (default: the queue
      item's uid under the queue server, else none).

    Appends the preprocessor to ``RE.preprocessors`` (last, so that devices other
    preprocessors such as ``SupplementalData`` add are in the up-front request), wraps the
    RunEngine's device commands with the lock check and registers the ``coordination_lock``
    command, chains ``RE.state_hook`` (the plan's locks end when the RunEngine goes idle),
    installs the ``LockPreemptedSuspender`` and starts the client (lock requests, lease
    heartbeats and the WebSocket event stream, on a thread of its own). Commands registered
    after ``install`` are not checked: call ``install`` again after registering them. If the
    service is down now, startup goes on; plans fail with a clear error until it is back.
    """
    previous = _HANDLES.get(RE)
    if previous is not None:
        previous.uninstall()
    # A handle lost elsewhere (e.g. the module was reloaded): remove its pieces by kind.
    RE.preprocessors[:] = [p for p in RE.preprocessors
                           if not getattr(p, "_bs_coordination", False)]
    for s in RE.suspenders:
        if type(s).__name__ == LockPreemptedSuspender.__name__:
            RE.remove_suspender(s)

    coordinator = PlanCoordinator(url, user_id, wait, lease, ws_url=ws_url, api_key=api_key,
                                  reason=reason, heartbeat=heartbeat, http_timeout=http_timeout,
                                  plan_uid=plan_uid)
    suspender = LockPreemptedSuspender()
    coordinator.add_preemption_listener(suspender.update)
    coordinator.add_resume_hook(suspender.recheck)
    coordinator.start()
    hooks: RunEngineHooks | None = None
    if RunEngineHooks.supported(RE):
        hooks = RunEngineHooks(RE, coordinator)
        hooks.attach()
        preprocessor = CoordinatedPreprocessor(coordinator, RE, start=hooks.start_plan)
    else:
        log.warning("this RunEngine has no command registry to wrap: plans are wrapped "
                    "instead (a few percent slower)")
        preprocessor = CoordinatedPreprocessor(coordinator, RE)
        RE.register_command(LOCK_COMMAND, lock_command)
    RE.install_suspender(suspender)
    RE.preprocessors.append(preprocessor)
    handle = CoordinationHandle(RE, coordinator, suspender, preprocessor, hooks)
    _HANDLES[RE] = handle
    log.info("device coordination installed: %s as %r (wait %g s, lease %g s)", url, user_id,
             wait, lease)
    return handle


__all__ = ["CoordinationHandle", "RunEngineHooks", "install"]
