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
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from bs_coordination._re_coordinator import PlanCoordinator
from bs_coordination.plans import LOCK_COMMAND, CoordinatedPreprocessor, lock_command
from bs_coordination.suspender import LockPreemptedSuspender

log = logging.getLogger(__name__)

_HANDLES: weakref.WeakKeyDictionary[Any, CoordinationHandle] = weakref.WeakKeyDictionary()


class CoordinationHandle:
    """What ``install()`` put into a RunEngine; ``uninstall()`` takes it out again."""

    def __init__(self, RE: Any, coordinator: PlanCoordinator, suspender: LockPreemptedSuspender,
                 preprocessor: CoordinatedPreprocessor) -> None:
        self.RE = RE
        self.coordinator = coordinator
        self.suspender = suspender
        self.preprocessor = preprocessor
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
        """Remove the preprocessor, the suspender and the command, and stop the client.

        Locks held by a plan still running are left to their lease."""
        if not self.installed:
            return
        self.installed = False
        RE = self.RE
        RE.preprocessors[:] = [p for p in RE.preprocessors if p is not self.preprocessor]
        if self.suspender in RE.suspenders:
            RE.remove_suspender(self.suspender)
        if LOCK_COMMAND in RE.commands and not _others(RE, self):
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

    Appends the plan preprocessor to ``RE.preprocessors`` (last, so it also sees what other
    preprocessors such as ``SupplementalData`` insert), registers the ``coordination_lock``
    command, installs the ``LockPreemptedSuspender`` and starts the client (lock requests,
    lease heartbeats and the WebSocket event stream, on a thread of its own). If the service
    is down now, startup goes on; plans fail with a clear error until it is back.
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
    preprocessor = CoordinatedPreprocessor(coordinator, RE)
    RE.register_command(LOCK_COMMAND, lock_command)
    RE.install_suspender(suspender)
    RE.preprocessors.append(preprocessor)
    handle = CoordinationHandle(RE, coordinator, suspender, preprocessor)
    _HANDLES[RE] = handle
    log.info("device coordination installed: %s as %r (wait %g s, lease %g s)", url, user_id,
             wait, lease)
    return handle


__all__ = ["CoordinationHandle", "install"]
