"""A RunEngine suspender that trips when a lock of the running plan is preempted.

It watches no ophyd signal: the ``PlanCoordinator`` tells it, from the service's WebSocket
events, which of the plan's devices are preempted. It trips on the first preemption, with a
justification naming device, preemptor and reason, and clears when every lock is restored;
the RunEngine then resumes from its last checkpoint. It also trips while the event stream is
down during a plan (a preemption then would go unnoticed), until it has reconnected and
resynchronised.

Thread safety: ``update()`` may be called from any thread; the trip and the clear always run
on the RunEngine loop (``RE.loop.call_soon_threadsafe``). ``SuspenderBase.__call__`` waits only
0.1 s for the loop when called from another thread and then raises, so it is never called
from anywhere else.

Two cases ``SuspenderBase`` alone gets wrong:

- a trip while the RunEngine is paused (or pausing) only marks the suspender tripped, and
  ``RE.resume()`` would run the plan straight on. ``recheck()`` runs when the RunEngine
  resumes (the coordinator is a ``Pausable`` object of the plan) and requests the suspension
  then, after the RunEngine has rewound and before it runs a message;
- after a WebSocket reconnect the coordinator resynchronises from the full status and calls
  ``update()`` with the result, so a preemption or restore missed meanwhile still counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from bluesky.suspenders import SuspenderBase

from bs_coordination.models import DeviceLock

log = logging.getLogger(__name__)


class _NoSignal:
    """Stands in for the ophyd signal a ``SuspenderBase`` expects; never calls back."""

    name = "device_lock_preempted"

    def subscribe(self, cb: Any, event_type: Any = None, run: bool = True) -> int:
        return 0

    def clear_sub(self, cb: Any, event_type: Any = None) -> None:
        pass

    def __repr__(self) -> str:
        return "device lock preempted"


def justification(preempted: Mapping[str, DeviceLock]) -> str:
    """``Device 'motor' was preempted by 'bob' (MAINTENANCE on 'motor'), reason: '...'``."""
    parts = []
    for name, lock in sorted(preempted.items()):
        by = lock.preempted_by
        if by is None:
            parts.append(f"device {name!r} was preempted")
            continue
        text = f"device {name!r} was preempted by {by.user_id!r} ({by.lock_type.value}"
        if by.device_name != name:
            text += f" on {by.device_name!r}"
        text += ")"
        if by.reason:
            text += f", reason: {by.reason!r}"
        parts.append(text)
    return "; ".join(parts)


class LockPreemptedSuspender(SuspenderBase):
    """Suspends the RunEngine while any lock of its running plan is preempted (or the lock
    event stream is down during a plan).

    ``install()`` creates and installs it; the coordinator feeds it through ``update()``.
    ``why`` says what keeps it tripped.
    """

    def __init__(self, *, sleep: float = 0, pre_plan: Any = None, post_plan: Any = None) -> None:
        super().__init__(_NoSignal(), sleep=sleep, pre_plan=pre_plan, post_plan=post_plan)
        self.preempted: dict[str, DeviceLock] = {}
        self.offline: str | None = None
        self._requested = False  # a suspension was requested for the current trip (loop only)

    def __repr__(self) -> str:
        return f"LockPreemptedSuspender(tripped={self.tripped})"

    def _should_suspend(self, value: Any) -> bool:
        return bool(value)

    def _should_resume(self, value: Any) -> bool:
        return not value

    def update(self, preempted: Mapping[str, DeviceLock], offline: str | None = None) -> None:
        """Any thread: ``preempted`` is every preempted lock of the running plan, by device;
        ``offline`` says why the lock event stream is down while the plan runs."""
        re = self.RE
        if re is None:
            return
        re.loop.call_soon_threadsafe(self._apply, dict(preempted), offline)

    def _apply(self, preempted: dict[str, DeviceLock], offline: str | None = None) -> None:
        """On the RunEngine loop."""
        if self.RE is None:
            return
        self.preempted = preempted
        self.offline = offline
        if preempted or offline:
            reasons = [justification(preempted)] if preempted else []
            reasons += [offline] if offline else []
            self._tripped_message = "; ".join(reasons)
            if not self.tripped:
                # SuspenderBase requests the suspension only when the RunEngine is running.
                self._requested = bool(self.RE.state.is_running)
                log.warning("suspending the RunEngine: %s", self._tripped_message)
                self(True)
        elif self.tripped:
            log.info("every lock is restored and the event stream is up: the RunEngine may "
                     "resume")
            self._requested = False
            self(False)

    async def recheck(self) -> None:
        """On the RunEngine loop, when it resumes a plan: a trip it did not act on (it was
        paused) is requested now."""
        if not self.tripped or self._requested or self.RE is None:
            return
        futures, why = self.get_futures()
        if not futures:
            return
        self._requested = True
        log.warning("the RunEngine resumes while a lock is preempted: suspending again (%s)", why)
        self.RE.request_suspend(futures[0], pre_plan=self._pre_plan, post_plan=self._post_plan,
                                justification=why)
        # request_suspend schedules its work with call_soon_threadsafe + create_task: let it
        # run now, so it is in place before the RunEngine takes its next message.
        for _ in range(3):
            await asyncio.sleep(0)

    @property
    def why(self) -> str:
        """The justification while tripped (device, preemptor, reason), else ``""``."""
        return self._get_justification()

    def _get_justification(self) -> str:
        if not self.tripped:
            return ""
        return self._tripped_message or "a device lock of this RunEngine is preempted"


__all__ = ["LockPreemptedSuspender", "justification"]
