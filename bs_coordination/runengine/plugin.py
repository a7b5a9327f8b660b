"""``install(RE, ...)``: device coordination for a RunEngine, in one call from startup code.

::

    # profile_collection/startup/10-coordination.py
    from bluesky import RunEngine
    from bs_coordination import install

    RE = RunEngine({})
    coordination = install(RE, url="http://localhost:60620", user_id="queue_server")

From then on every plan run by ``RE`` holds ``QUEUE_EXECUTING`` locks on the devices it
touches, releases them when it ends, and suspends while maintenance has taken one of them.
``install`` returns a ``CoordinationHandle``; ``handle.status()`` says whether coordination is
active, ``handle.uninstall()`` undoes it. Calling ``install`` again on the same RunEngine (a
queue-server script upload re-runs startup code) replaces the first installation instead of
adding a second one.

The plugin is invisible to plans, devices and callbacks: it adds no message to the plan, wraps
no generator, and the RunEngine processes (and ``RE.msg_hook`` sees) exactly the messages of
the plan. How:

- the preprocessor (last in ``RE.preprocessors``) hands the RunEngine the plan generator
  itself; it only opens the plan's session and notes the devices known up front (the plan's
  bound arguments);
- the RunEngine's commands (all of them, and any command registered before ``install``) are
  re-registered wrapped. Before the plan's first message runs, its wrapped command awaits the
  up-front devices in one atomic request (inside the RunEngine loop: the RunEngine is never
  blocked). A device message whose object is not yet covered by a held lock awaits that
  device's lock before the original command runs (``args`` too for ``collect``/``locate``);
  once covered, one set lookup. A plan that does not go through the preprocessor (someone
  replaced ``RE.preprocessors``) is still coordinated this way, device by device, with a
  warning;
- the plan's session ends when the RunEngine goes back to idle (``RE.state_hook``, chained
  to any hook already there): locks released after a normal end, an exception, a stop or an
  abort; after a halt (or a panic) they are left to expire with their lease. The same hook
  sees the RunEngine resume after a pause: before the next message runs, a preemption that
  arrived while paused suspends it (``LockPreemptedSuspender.recheck``).

bluesky has no public getter for a registered command, so the wrapped originals are read
from ``RE._command_registry`` (bluesky 1.15); a RunEngine without it gets the wrapping
preprocessor (``coordinated_wrapper``) instead.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from typing import Any

from bluesky.utils import Msg, ensure_generator

from bs_coordination.errors import CoordinationError
from bs_coordination.runengine._client_thread import queue_item_name
from bs_coordination.runengine._coordinator import PlanCoordinator
from bs_coordination.runengine._tracker import PlanLocks
from bs_coordination.runengine.plans import (
    LOCK_COMMAND,
    CoordinatedPreprocessor,
    coordinated_wrapper,
    lock_command,
    lock_message_devices,
    plan_devices,
    plan_name,
    upfront_names,
)
from bs_coordination.runengine.suspender import LockPreemptedSuspender

log = logging.getLogger(__name__)

_HANDLES: weakref.WeakKeyDictionary[Any, CoordinationHandle] = weakref.WeakKeyDictionary()

Command = Callable[[Msg], Coroutine[Any, Any, Any]]

#: RunEngine commands whose messages never carry a device (no lock check on them; they only
#: wait for the plan's up-front locks when they are its first message).
#: ``declare_stream`` names devices in ``args`` but only describes them.
_NO_DEVICE_COMMANDS = frozenset({
    "RE_class", "checkpoint", "clear_checkpoint", "close_run", "create", "declare_stream",
    "drop", "input", "null", "open_run", "pause", "rewindable", "save", "sleep", "subscribe",
    "unsubscribe",
})
#: Commands left alone: the RunEngine's own around a suspension, and ``wait_for`` (which
#: ``RE(plan)`` pushes ahead of the plan while a suspender is tripped).
_UNWRAPPED = frozenset({
    "_resume_from_suspender", "_start_suspender", "install_suspender", "remove_suspender",
    "wait_for", LOCK_COMMAND,
})
#: Commands that carry further devices in ``msg.args``.
_ARGS_COMMANDS = frozenset({"collect", "locate"})
#: Attribute naming the original of a wrapped command (and the previous hook of ours).
_ORIGINAL = "_bs_coordination_original"
#: ``covered`` while a check is due before the next device message: every lookup misses.
_NOTHING: frozenset[Any] = frozenset()


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


def _coordination_error(what: str, exc: BaseException) -> CoordinationError:
    if isinstance(exc, CoordinationError):
        return exc
    return CoordinationError(f"device coordination {what}: {exc!r}")


def _fail(exc: BaseException) -> Generator[Msg, Any, Any]:
    raise exc
    yield  # a generator


class RunEngineHooks:
    """What ``install`` puts into the RunEngine's dispatch: the wrapped commands, the
    ``coordination_lock`` command (for ``coordinated_wrapper`` plans) and the state hook that
    ends a plan's session.

    Plan state, all on the RunEngine thread once the plan runs (set on the caller's thread by
    the preprocessor while the RunEngine is idle):

    - ``session``: the running plan's locks (``None`` between plans and until a plan that did
      not go through the preprocessor touches a device);
    - ``covered``: the objects needing no check (the session's set), or ``_NOTHING`` while a
      check is due: every device message then takes the slow path;
    - ``pending``: something must run before the next message of any kind (the up-front
      request, the re-check after a resume); ``denied``: the up-front request's refusal, raised
      again by every later device message of the plan (nothing of it may touch a device).
    """

    def __init__(self, RE: Any, coordinator: PlanCoordinator,
                 suspender: LockPreemptedSuspender) -> None:
        self.RE = RE
        self.coordinator = coordinator
        self.suspender = suspender
        self.preprocessor: CoordinatedPreprocessor | None = None
        self.session: PlanLocks | None = None
        self.covered: set[Any] | frozenset[Any] = _NOTHING
        self.pending = False
        self.denied: BaseException | None = None
        self._upfront: tuple[str, ...] | None = None
        self._resuming = False
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
            if name in _UNWRAPPED:
                continue
            original = _unwrapped(fn)
            self._originals[name] = original
            if name in _NO_DEVICE_COMMANDS:
                wrapped = self._first(original)
            else:
                wrapped = self._guarded(original, name in _ARGS_COMMANDS)
            RE.register_command(name, wrapped)
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
        self._reset()

    def commands_in_place(self) -> bool:
        """Every command wrapped at ``attach`` is still ours (none re-registered since)."""
        registry = _command_registry(self.RE) or {}
        return self.attached and all(
            getattr(registry.get(name), _ORIGINAL, None) is original
            for name, original in self._originals.items())

    def state_hook_in_place(self) -> bool:
        hook: Any = self.RE.state_hook
        for _ in range(100):  # ours, or a hook that chains to ours (by our marker)
            if hook is None or hook is self._state_hook:
                break
            hook = getattr(hook, _ORIGINAL, None)
        return hook is not None and hook is self._state_hook

    def _chain_state_hook(self) -> None:
        previous = _unwrapped(self.RE.state_hook)

        def state_hook(new: str, old: str) -> None:
            if self.attached:
                if new in ("idle", "panicked"):
                    # halting -> idle: a halt skips cleanup, so do we (the lease frees them).
                    self.end_plan(release=old != "halting" and new != "panicked")
                elif new == "running" and old == "paused" and self.session is not None:
                    # RunEngine thread, before the resumed plan's next message.
                    self._resuming = True
                    self._due()
            if previous is not None:
                previous(new, old)

        setattr(state_hook, _ORIGINAL, previous)
        self._state_hook = state_hook
        self.RE.state_hook = state_hook

    # -- plans ----------------------------------------------------------------------------------
    def start_plan(self, plan: Iterable[Msg]) -> Iterator[Msg]:
        """The preprocessor's work (caller's thread, RunEngine idle): a new session, the
        up-front devices noted; the plan is returned as it is."""
        if not self.RE.state.is_idle:
            # Not called by RE(plan) (which refuses a busy RunEngine) but by hand, mid-plan:
            # wrap it, so that it shares the running plan's locks and ends nothing.
            return coordinated_wrapper(plan, self.coordinator)
        self.end_plan(release=True)  # a session left by a plan that never ran
        self._check_in_place()
        gen = ensure_generator(plan)
        try:
            names = upfront_names(plan_devices(gen))
            session = self.coordinator.open_session(reason=self._reason(gen), new=True)[0]
        except Exception as exc:  # e.g. an uninstalled coordinator
            gen.close()
            # Raised by the RunEngine as the plan's first step: it cleans up as usual.
            return _fail(_coordination_error("could not start the plan", exc))
        self.session = session
        self.covered = session.covered
        if names:  # else no I/O before the plan's first message
            self._upfront = names
            self._due()
        return gen

    def _reason(self, gen: Any) -> str:
        name = queue_item_name() or plan_name(gen)
        return self.coordinator.reason or (f"RunEngine plan {name!r}" if name
                                           else "RunEngine plan")

    def _check_in_place(self) -> None:
        """A plan starts: put back, loudly, what someone took out since ``install``."""
        RE = self.RE
        if RE.state_hook is not self._state_hook and not self.state_hook_in_place():
            # Without it the locks would outlive the plan.
            log.warning("RE.state_hook was replaced after install(); chaining it again")
            self._chain_state_hook()
        if self.suspender not in RE.suspenders:
            log.warning("the device coordination suspender was removed from the RunEngine "
                        "(RE.clear_suspenders()?); installing it again so that maintenance "
                        "can still suspend plans")
            RE.install_suspender(self.suspender)
        if not self.commands_in_place():
            log.warning("a RunEngine command wrapped by install() was registered again since: "
                        "its messages are not coordinated; call install() again after "
                        "registering commands")

    def _due(self) -> None:
        """Something must run before the next message (RunEngine thread, or idle)."""
        self.pending = True
        self.covered = _NOTHING

    def _reset(self) -> None:
        self.session = None
        self.covered = _NOTHING
        self.pending = self._resuming = False
        self._upfront = None
        self.denied = None

    def end_plan(self, *, release: bool) -> None:
        session = self.session
        self._reset()
        if session is not None and not session.closed:
            try:
                self.coordinator.close_session(session, release=release)
            except Exception:  # never into the RunEngine's state machine
                log.exception("ending the locks of %r failed; they expire with their lease",
                              session)

    async def before(self) -> None:
        """RunEngine loop, before a message's command: what ``pending`` says is due."""
        self.pending = False
        session = self.session
        self.covered = session.covered if session is not None else _NOTHING
        try:
            if self._resuming:
                self._resuming = False
                # A preemption that came while paused: the suspension is requested now.
                await self.coordinator.resume()
            names = self._upfront
            if names is not None and session is not None:
                try:
                    await self.coordinator.acquire(session, names)
                except asyncio.CancelledError:
                    raise
                except CoordinationError as exc:
                    self._upfront = None
                    self.denied = exc
                    raise
                except Exception as exc:
                    self._upfront = None
                    self.denied = _coordination_error(f"could not lock {list(names)}", exc)
                    raise self.denied from exc
                self._upfront = None
        except asyncio.CancelledError:
            # A suspension or pause interrupted us: try again before the next message.
            if self._upfront is not None:
                self._due()
            raise

    def _late_session(self) -> PlanLocks:
        """A device message of a plan that did not go through the preprocessor."""
        log.warning("device coordination: this plan did not pass through its preprocessor "
                    "(RE.preprocessors was replaced after install()?): its devices are locked "
                    "one by one as they are first used, not in one request up front; call "
                    "install() again to restore it")
        session = self.coordinator.open_session(reason="RunEngine plan")[0]
        self.session = session
        self.covered = session.covered
        return session

    async def _check(self, msg: Msg) -> None:
        """The slow path of a device message: due work, then the locks of its devices."""
        if self.pending:
            await self.before()
        session = self.session
        if session is None:
            if not self.attached:
                return
            session = self._late_session()
        if self.denied is not None:
            raise self.denied
        try:
            await lock_message_devices(self.coordinator, session, msg)
        except (CoordinationError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a plan never fails with an error that hides its cause
            raise _coordination_error(f"failed before {msg.command!r} on {msg.obj!r}",
                                      exc) from exc

    def _first(self, original: Command) -> Command:
        """``original`` (a command that carries no device) preceded by the due work: the
        plan's up-front locks when it is the plan's first message."""
        hooks = self

        async def command(msg: Msg) -> Any:
            if hooks.pending:
                await hooks.before()
            return await original(msg)

        return self._named(command, original)

    def _guarded(self, original: Command, carries_args: bool) -> Command:
        """``original`` preceded by the lock check of the running plan. The fast path (the
        object is covered) is one attribute read and one set lookup."""
        hooks = self
        check = self._check

        if carries_args:
            async def command(msg: Msg) -> Any:
                await check(msg)
                return await original(msg)
        else:
            async def command(msg: Msg) -> Any:
                obj = msg.obj
                if obj is None:
                    if hooks.pending:
                        await hooks.before()
                else:
                    try:
                        known = obj in hooks.covered
                    except TypeError:  # unhashable: not a device
                        known = not hooks.pending
                    if not known:
                        await check(msg)
                return await original(msg)

        return self._named(command, original)

    @staticmethod
    def _named(command: Command, original: Command) -> Command:
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

    def status(self) -> dict[str, Any]:
        """Whether coordination is active on the RunEngine, and why not if it is not::

            {"active": True, "url": "http://localhost:60620", "user_id": "queue_server",
             "connected": True, "preprocessor": True, "commands": True, "state_hook": True,
             "suspender": True, "problems": []}

        ``active``: plans run by the RunEngine lock their devices and suspend on preemption
        (the wrapped commands and the suspender are in place; without the preprocessor
        devices are still locked, one by one, which ``problems`` says). ``connected``: the
        lock event stream is up now (a plan waits for it before it starts).
        """
        RE = self.RE
        hooks = self.hooks
        preprocessor = self.preprocessor in RE.preprocessors
        suspender = self.suspender in RE.suspenders
        commands = hooks.commands_in_place() if hooks is not None else preprocessor
        state_hook = hooks.state_hook_in_place() if hooks is not None else True
        client = self.coordinator.client
        connected = bool(client is not None and client.websocket_connected)
        problems = []
        if not self.installed:
            problems.append("uninstalled")
        if not preprocessor:
            problems.append("the preprocessor is not in RE.preprocessors: devices are locked "
                            "one by one when first used, not in one request up front"
                            if hooks is not None else
                            "the preprocessor is not in RE.preprocessors: plans are not "
                            "coordinated")
        elif RE.preprocessors[-1] is not self.preprocessor:
            problems.append("the preprocessor is not the last of RE.preprocessors: devices "
                            "added by later ones are locked when first used")
        if not commands:
            problems.append("a wrapped RunEngine command was registered again: its messages "
                            "are not coordinated")
        if not state_hook:
            problems.append("RE.state_hook was replaced: chained again when the next plan "
                            "starts")
        if not suspender:
            problems.append("the suspender was removed: installed again when the next plan "
                            "starts")
        if not connected:
            problems.append(f"no lock event stream from {self.coordinator.url} now")
        return {
            "active": self.installed and commands and (preprocessor or hooks is not None),
            "url": self.coordinator.url,
            "user_id": self.coordinator.user_id,
            "connected": connected,
            "preprocessor": preprocessor,
            "commands": commands,
            "state_hook": state_hook,
            "suspender": suspender,
            "problems": problems,
        }

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
    resume_gate: Any = None,
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
      item's uid under the queue server, else none);
    - ``resume_gate``: e.g. a ``bs_coordination.epics.gate.ResumeGate`` (anything with
      ``attach(handle)``): after a suspension the RunEngine resumes only once it says the
      IOCs let the queue write again.

    Appends the preprocessor to ``RE.preprocessors`` (last, so that devices other
    preprocessors such as ``SupplementalData`` add are in the up-front request), wraps the
    RunEngine's commands (device commands with the lock check, the others with the wait for
    the up-front locks before a plan's first message) and registers the ``coordination_lock``
    command (for ``coordinated_wrapper`` plans), chains ``RE.state_hook`` (the plan's locks
    end when the RunEngine goes idle),
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
    for s in list(RE.suspenders):
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
        hooks = RunEngineHooks(RE, coordinator, suspender)
        hooks.attach()
        preprocessor = CoordinatedPreprocessor(coordinator, RE, start=hooks.start_plan)
        hooks.preprocessor = preprocessor
    else:
        log.warning("this RunEngine has no command registry to wrap: plans are wrapped "
                    "instead (a few percent slower, and a 'coordination_lock' message "
                    "starts each plan)")
        preprocessor = CoordinatedPreprocessor(coordinator, RE)
        RE.register_command(LOCK_COMMAND, lock_command)
    RE.install_suspender(suspender)
    RE.preprocessors.append(preprocessor)
    handle = CoordinationHandle(RE, coordinator, suspender, preprocessor, hooks)
    _HANDLES[RE] = handle
    if resume_gate is not None:
        resume_gate.attach(handle)
    log.info("device coordination installed: %s as %r (wait %g s, lease %g s)", url, user_id,
             wait, lease)
    return handle


__all__ = ["CoordinationHandle", "RunEngineHooks", "install"]
