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
  resumes (through the coordinator's ``resume()``: see ``PlanCoordinator``) and requests the
  suspension then, after the RunEngine has rewound and before it runs a message;
- after a WebSocket reconnect the coordinator resynchronises from the full status and calls
  ``update()`` with the result, so a preemption or restore missed meanwhile still counts.

The preemption handshake: the plan's locks ask for it, so maintenance is answered only once
this RunEngine has stopped using the device. The suspender says when: ``acknowledge`` (set by
the ``PlanCoordinator`` it listens to) is called on the RunEngine loop once the RunEngine has
suspended (its suspension's ``pre_plan`` runs after ``stop()`` was called on every mover the
plan touched and ``pause()`` on its devices, and nothing of the plan runs until the
suspension ends), or at once when the RunEngine is idle or paused or already suspended.
Meanwhile the plan's messages on the preempted device are held by the RunEngine hooks (the
lock is no longer "covered"), so no device message runs between the preemption and the
acknowledgement that the suspension did not stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from bluesky.suspenders import SuspenderBase

from bs_coordination.models import DeviceLock, PreemptionAck

log = logging.getLogger(__name__)

#: RunEngine states in which it runs no plan message: a preemption is acknowledged at once.
_QUIET_STATES = frozenset({"idle", "paused", "panicked"})
#: How often a preemption waiting for a quiet RunEngine looks again (pausing, aborting...).
_ACK_POLL_SECONDS = 0.01


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

    def __init__(self, *, sleep: float = 0, pre_plan: Any = None, post_plan: Any = None,
                 acknowledge: Callable[[], None] | None = None) -> None:
        # Our own pre_plan runs first: the moment the RunEngine has suspended.
        super().__init__(_NoSignal(), sleep=sleep, pre_plan=self._suspended_now,
                         post_plan=post_plan)
        self._user_pre_plan = pre_plan
        self.preempted: dict[str, DeviceLock] = {}
        self.offline: str | None = None
        #: Called (RunEngine loop) when the RunEngine stopped using its devices and a
        #: preemption handshake waits: the coordinator acknowledges every pending one.
        self.acknowledge = acknowledge
        self._requested = False  # a suspension was requested for the current trip (loop only)
        self._suspended = False  # our suspension's pre_plan ran and it has not ended (loop only)
        self._ack_polling = False  # a look at a RunEngine in transition is scheduled (loop only)

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
                state = str(self.RE.state)
                self._requested = state == "running"
                log.warning("suspending the RunEngine: %s", self._tripped_message)
                self(True)
                if state == "suspending" and self.tripped:
                    # Another suspension is under way: ours goes on top of it, so that our
                    # pre_plan says when the RunEngine has stopped.
                    self._request_now(self._get_justification())
            self._acknowledge_when_stopped()
        elif self.tripped:
            log.info("every lock is restored and the event stream is up: the RunEngine may "
                     "resume")
            self._requested = False
            self._suspended = False
            self(False)

    # -- the preemption handshake (RunEngine loop) ----------------------------------------
    def _handshake_due(self) -> bool:
        return self.acknowledge is not None and any(
            lock.preemption_ack is PreemptionAck.PENDING for lock in self.preempted.values())

    def _acknowledge_when_stopped(self) -> None:
        """Acknowledge the pending preemptions now if the RunEngine runs no plan message
        (idle, paused, or suspended by us); else our suspension's pre_plan will, or a later
        look (a RunEngine pausing or ending its plan)."""
        if not self._handshake_due() or self.RE is None:
            return
        state = str(self.RE.state)
        if self._suspended or state in _QUIET_STATES:
            self._send_acknowledgement()
        elif not (self._requested and state in ("running", "suspending")) \
                and not self._ack_polling:
            self._ack_polling = True
            self.RE.loop.call_later(_ACK_POLL_SECONDS, self._poll_acknowledgement)

    def _poll_acknowledgement(self) -> None:
        self._ack_polling = False
        self._acknowledge_when_stopped()

    def _send_acknowledgement(self) -> None:
        assert self.acknowledge is not None
        try:
            self.acknowledge()
        except Exception:  # the deadline answers maintenance anyway
            log.exception("could not acknowledge the preemption")

    def _suspended_now(self) -> Any:
        """Our suspension's pre_plan, called by the RunEngine once it has called ``stop()``
        on the plan's movers and ``pause()`` on its devices, before it waits: the devices
        are no longer in use."""
        self._suspended = True
        if self._handshake_due():
            self._send_acknowledgement()
        pre_plan = self._user_pre_plan
        return pre_plan() if callable(pre_plan) else pre_plan

    def _request_now(self, why: str) -> None:
        futures, _ = self.get_futures()
        if not futures or self.RE is None:
            return
        self._requested = True
        self.RE.request_suspend(futures[0], pre_plan=self._pre_plan, post_plan=self._post_plan,
                                justification=why)

    async def recheck(self) -> None:
        """On the RunEngine loop, when it resumes a plan: a trip it did not act on (it was
        paused) is requested now."""
        if not self.tripped or self._requested or self.RE is None:
            return
        futures, why = self.get_futures()
        if not futures:
            return
        log.warning("the RunEngine resumes while a lock is preempted: suspending again (%s)", why)
        self._request_now(why)
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
