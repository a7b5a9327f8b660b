"""Wait until the IOCs let the queue account write again (the RunEngine's resume gate).

After maintenance releases a device and the queue's lock is restored, the IOC's access rules
follow through the bridge a few milliseconds later; a plan resumed at once writes into a
refusal. ``ResumeGate.wait(devices)`` returns once, for every device,

- the bridge's ``<prefix><device>:LOCK`` is connected, not INVALID, and reads a value under
  which the IOC rules let a queue account write: -1 (free), 3 (QUEUE_QUEUED), or
  1 (QUEUE_EXECUTING), held by ``user_id`` when one is given (``<prefix><device>:HOLDER``);
- and, for the records named in ``records`` (optional), the IOC itself grants this process's
  Channel Access user write access (the access rights the IOC pushes to the client). This
  closes the short window between the bridge's PV and the IOC's rules.

It raises ``TimeoutError`` naming what it still waits for. Channel Access goes through
caproto's threading client (``client_name`` is the CA user; by default the login name, as
ophyd's clients use); a channel unconnected for ``RECONNECT_AFTER`` seconds of a wait is
searched for again with a fresh client context. ::

    gate = ResumeGate("BL:LOCKS:", user_id="queue_server", records={"m1": ["XF:31ID{Mtr:1}"]})
    gate.wait(["m1"], timeout=30)          # from any thread
    await gate.wait_async(["m1"], timeout=30)  # from an event loop (never blocks it)
    gate.close()

With the RunEngine plugin, ``install(RE, ..., resume_gate=gate)`` (or
``gate.attach(install(RE, ...))``) makes the RunEngine wait for the gate each time it resumes
after a suspension, before it replays the plan from its checkpoint:
for the devices (among the gate's ``devices``) that were preempted meanwhile, and, after a
lost event stream, until the bridge's PVs of the gate's devices are valid again. A gate that
times out fails the plan with its ``TimeoutError`` (the IOC would refuse its writes anyway).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from caproto import AccessRights, AlarmSeverity
from caproto.threading.client import PV, Context

from bs_coordination.epics.pvnames import (
    FREE,
    check_epics_device_name,
    check_prefix,
    holder_pv,
    lock_pv,
)
from bs_coordination.models import LockType

log = logging.getLogger(__name__)

#: Seconds a channel may stay unconnected during a ``wait`` before the gate searches again with a
#: fresh client context. caproto's threading client gives up on every later search of a context
#: when one server is slow to answer a new circuit's version handshake (its search-results
#: thread ends on that time-out), which a loaded IOC can cause; a fresh context recovers.
RECONNECT_AFTER = 10.0

#: ``:LOCK`` values under which the IOC rules let queue accounts write.
QUEUE_WRITABLE = frozenset({FREE, LockType.QUEUE_EXECUTING.priority, LockType.QUEUE_QUEUED.priority})

_NAMES = {t.priority: t.value for t in LockType}

#: The RunEngine command that runs when a suspension ends, before the plan is replayed.
_RESUME_COMMAND = "_resume_from_suspender"
#: Attribute of the gate's wrapper naming the command it wraps.
_ORIGINAL = "_bs_coordination_resume_gate_original"


@dataclass
class _Reading:
    """The latest monitor update of one PV (``None`` before the first one / when disconnected)."""

    value: Any = None
    severity: int | None = None


def lock_permits_queue(value: int | None, severity: int | None, holder: str | None,
                       user_id: str | None) -> bool:
    """True if a ``:LOCK`` reading lets a queue account (``user_id``, if given) write."""
    if value is None or severity is None or severity >= AlarmSeverity.INVALID_ALARM:
        return False
    if value not in QUEUE_WRITABLE:
        return False
    if value == LockType.QUEUE_EXECUTING.priority and user_id is not None:
        return holder == user_id
    return True


class ResumeGate:
    """See the module docstring. ``prefix`` is the bridge's ``--prefix``; ``records`` maps a
    device to PV or record names on the IOC whose write access to check as well."""

    def __init__(self, prefix: str, *, user_id: str | None = None,
                 devices: Sequence[str] | None = None,
                 records: Mapping[str, Sequence[str]] | None = None,
                 client_name: str | None = None, timeout: float = 60.0) -> None:
        self.prefix = check_prefix(prefix)
        self.user_id = user_id
        self.records = {device: list(names) for device, names in (records or {}).items()}
        #: The devices whose writes the IOCs enforce (served by the bridge): what ``attach``
        #: waits for. Default: the devices of ``records``.
        self.devices = frozenset(check_epics_device_name(d) for d in (devices or self.records))
        self.client_name = client_name or getpass.getuser()
        self.timeout = timeout
        self._context: Context | None = None
        self._pvs: dict[str, PV] = {}
        self._readings: dict[str, _Reading] = {}
        self._changed = threading.Condition()
        self._subscriptions: list[Any] = []
        self._pending: set[str] = set()  # preempted since the last resume (attach)
        self._was_offline = False  # the event stream was lost since the last resume (attach)
        self._pending_lock = threading.Lock()
        self._watch_lock = threading.Lock()  # one thread at a time connects new PVs

    def __repr__(self) -> str:
        return f"<ResumeGate prefix={self.prefix!r} user={self.client_name!r}>"

    # -- waiting -----------------------------------------------------------------------------
    def wait(self, devices: Sequence[str], timeout: float | None = None, *,
             valid_only: bool = False) -> None:
        """Block until the queue account may write every device (see the module docstring);
        with ``valid_only``, only until the bridge's PVs of the devices are connected and not
        INVALID (whoever holds them).

        Raises ``TimeoutError`` after ``timeout`` seconds (default: the gate's), naming what
        still blocks; ``ValueError`` for a device name the bridge cannot serve."""
        for device in devices:
            check_epics_device_name(device)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._watch(devices)
        connected_at = time.monotonic()  # when every channel of ``devices`` was last connected
        while True:
            with self._changed:
                blocked = self.blocked(devices, valid_only=valid_only)
                if not blocked:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the IOCs still refuse the queue's writes after "
                                       f"{limit:g} s: {'; '.join(blocked)}")
                self._changed.wait(min(left, 0.5))
            missing = self._unconnected(devices)
            if not missing:
                connected_at = time.monotonic()
            elif time.monotonic() - connected_at >= RECONNECT_AFTER:
                log.warning("no Channel Access connection to %s for %g s: searching again "
                            "with a fresh client context", ", ".join(missing), RECONNECT_AFTER)
                self._restart(devices)
                connected_at = time.monotonic()

    async def wait_async(self, devices: Sequence[str], timeout: float | None = None, *,
                         valid_only: bool = False) -> None:
        """``wait`` from an event loop, in a worker thread (the loop keeps running)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.wait(list(devices), timeout,
                                                           valid_only=valid_only))

    def __call__(self, devices: Sequence[str]) -> Any:
        """A resume gate for ``install(RE, resume_gate=...)``: ``wait_async(devices)``."""
        return self.wait_async(devices)

    def blocked(self, devices: Sequence[str], *, valid_only: bool = False) -> list[str]:
        """What keeps the queue from writing each device now ([] when nothing does)."""
        reasons = []
        for device in devices:
            lock = self._readings.get(lock_pv(self.prefix, device), _Reading())
            holder = self._readings.get(holder_pv(self.prefix, device), _Reading())
            holder_text = holder.value if isinstance(holder.value, str) else None
            if valid_only:
                if lock.value is None or lock.severity is None \
                        or lock.severity >= AlarmSeverity.INVALID_ALARM:
                    reasons.append(f"{device}: {self._describe(device, lock, holder_text)}")
                continue
            if not lock_permits_queue(lock.value, lock.severity, holder_text, self.user_id):
                reasons.append(f"{device}: {self._describe(device, lock, holder_text)}")
                continue
            for record in self.records.get(device, []):
                pv = self._pvs.get(record)
                rights = pv.access_rights if pv is not None and pv.connected else None
                if rights is None or not rights & AccessRights.WRITE:
                    reasons.append(f"{device}: the IOC does not let {self.client_name!r} write "
                                   f"{record}" + (" (not connected)" if rights is None else ""))
        return reasons

    def _describe(self, device: str, lock: _Reading, holder: str | None) -> str:
        if lock.value is None:
            return f"no connection to the bridge's {lock_pv(self.prefix, device)}"
        if lock.severity is not None and lock.severity >= AlarmSeverity.INVALID_ALARM:
            return "LOCK is INVALID (the bridge lost the coordination service)"
        what = _NAMES.get(lock.value, str(lock.value))
        return f"LOCK {lock.value} ({what}) held by {holder!r}"

    # -- the RunEngine plugin ------------------------------------------------------------------
    def attach(self, handle: Any) -> None:
        """Make the RunEngine of ``handle`` (what ``install(RE, ...)`` returned) wait for this
        gate whenever it resumes a plan after a suspension (see the module docstring).

        The plugin's coordinator tells the gate which devices were preempted
        (``add_preemption_listener``). The wait runs in the RunEngine's
        ``_resume_from_suspender`` command, which the RunEngine runs once every suspender has
        cleared and before it replays the plan from its checkpoint: the gate wraps that
        command (bluesky has no public hook there; ``install`` leaves it alone). After a pause
        (``RE.resume()``) it runs as the coordinator's resume hook. ``install(RE, ...,
        resume_gate=gate)`` calls it; called by hand, call it again after every ``install`` on
        the RunEngine. ``detach`` undoes it.
        """
        coordinator = handle.coordinator
        coordinator.add_preemption_listener(self._on_preemption)
        coordinator.add_resume_hook(self.before_resume)
        self.detach(handle.RE)
        registry = getattr(handle.RE, "_command_registry", None)
        original = registry.get(_RESUME_COMMAND) if isinstance(registry, dict) else None
        if original is None:
            raise RuntimeError(f"this RunEngine has no {_RESUME_COMMAND!r} command to wrap "
                               "(bluesky 1.15 has it)")

        async def resume_from_suspender(msg: Any) -> Any:
            await self.before_resume()
            return await original(msg)

        setattr(resume_from_suspender, _ORIGINAL, original)
        handle.RE.register_command(_RESUME_COMMAND, resume_from_suspender)

    @staticmethod
    def detach(RE: Any) -> None:
        """Give ``RE`` its own ``_resume_from_suspender`` command back (no-op if no gate is
        attached)."""
        registry = getattr(RE, "_command_registry", None)
        command = registry.get(_RESUME_COMMAND) if isinstance(registry, dict) else None
        original = getattr(command, _ORIGINAL, None)
        if original is not None:
            RE.register_command(_RESUME_COMMAND, original)

    def _on_preemption(self, preempted: Mapping[str, Any], offline: str | None) -> None:
        """The plugin's client thread: the plan's preempted locks and the offline reason."""
        with self._pending_lock:
            self._pending.update(d for d in (n.split(".", 1)[0] for n in preempted)
                                 if d in self.devices)
            self._was_offline = self._was_offline or offline is not None

    async def before_resume(self) -> None:
        """On the RunEngine loop as it resumes: wait until the IOCs let the queue write the
        devices preempted meanwhile (and, after a lost event stream, until the bridge's PVs
        are valid again)."""
        with self._pending_lock:
            pending, was_offline = sorted(self._pending), self._was_offline
        if was_offline and self.devices:
            log.info("the RunEngine resumes after a lost event stream: waiting for the "
                     "bridge's lock PVs to be valid")
            await self.wait_async(sorted(self.devices), valid_only=True)
        if pending:
            log.info("the RunEngine resumes: waiting until the IOCs let %r write %s",
                     self.client_name, ", ".join(pending))
            await self.wait_async(pending)
        with self._pending_lock:
            self._pending.difference_update(pending)
            self._was_offline = self._was_offline and not was_offline

    # -- Channel Access ----------------------------------------------------------------------
    def _names(self, device: str) -> list[str]:
        """The channels the gate reads for ``device``: the bridge's two PVs, then its records."""
        return [lock_pv(self.prefix, device), holder_pv(self.prefix, device),
                *self.records.get(device, [])]

    def _unconnected(self, devices: Sequence[str]) -> list[str]:
        return [name for device in devices for name in self._names(device)
                if (pv := self._pvs.get(name)) is None or not pv.connected]

    def _restart(self, devices: Sequence[str]) -> None:
        """Drop the client context and connect ``devices`` again (other devices reconnect at
        their next ``wait``)."""
        with self._watch_lock:
            self.close()
        self._watch(devices)

    def _watch(self, devices: Sequence[str]) -> None:
        """Connect (once) to the PVs of ``devices`` and follow them."""
        names: list[str] = []
        followed: set[str] = set()  # the bridge's PVs, whose values the gate reads
        for device in devices:
            followed |= {lock_pv(self.prefix, device), holder_pv(self.prefix, device)}
            names += self._names(device)
        with self._watch_lock:
            self._connect([name for name in dict.fromkeys(names) if name not in self._pvs],
                          followed)

    def _connect(self, new: list[str], followed: set[str]) -> None:
        if not new:
            return
        if self._context is None:
            self._context = Context(client_name=self.client_name)
        pvs = self._context.get_pvs(*new, timeout=2.0, connection_state_callback=self._on_state,
                                    access_rights_callback=self._on_rights)
        for name, pv in zip(new, pvs, strict=True):
            self._pvs[name] = pv
            if name in followed:
                self._readings.setdefault(name, _Reading())
                sub = pv.subscribe(data_type="time")
                sub.add_callback(self._on_value)
                self._subscriptions.append(sub)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _on_value(self, sub: Any, response: Any) -> None:
        value = response.data[0] if len(response.data) else None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        elif value is not None and not isinstance(value, str):
            value = int(value)
        self._readings[sub.pv.name] = _Reading(value, int(response.metadata.severity))
        self._notify()

    def _on_state(self, pv: PV, state: str) -> None:
        if state != "connected" and pv.name in self._readings:
            self._readings[pv.name] = _Reading()
        self._notify()

    def _on_rights(self, pv: PV, rights: AccessRights) -> None:
        self._notify()

    def close(self) -> None:
        """Drop the subscriptions and disconnect."""
        for sub in self._subscriptions:
            sub.clear()
        self._subscriptions.clear()
        if self._context is not None:
            self._context.disconnect()
            self._context = None
        self._pvs.clear()
        self._readings.clear()


__all__ = ["QUEUE_WRITABLE", "ResumeGate", "lock_permits_queue"]
