"""The EPICS access-security bridge: the lock table as Channel Access PVs.

For each device it serves

- ``<prefix><device>:LOCK``: the active lock's priority (0 MAINTENANCE, 1 QUEUE_EXECUTING,
  2 MANUAL_OPERATOR, 3 QUEUE_QUEUED), or -1 when the device is free;
- ``<prefix><device>:HOLDER``: the active holder's ``user_id``, "" when free;

and keeps them in step with the service's event stream through the client library
(``DeviceCoordinationClient`` WebSocket monitoring, which resumes by event id after a lost
connection). While the bridge is not in step with the service (not connected yet, connection
lost, reconnected but the fresh status not applied yet) every PV has INVALID severity, so IOC
access-security rules that read ``:LOCK`` through ``INPA`` fail closed; they follow again by
themselves once the service is back.

A lock on a component (``det1.cam``) shows on its root's PVs when the root itself is free: the
highest-priority such lock (the most restrictive reading for the IOC's rules).

The CA server is caproto's asyncio server: pure Python, it runs in the bridge's own event loop
beside the WebSocket client (pythonSoftIOC embeds a whole IOC, one per process, and would need
a thread hand-over for every update). It honours the standard variables
(``EPICS_CA_SERVER_PORT``, ``EPICS_CAS_INTF_ADDR_LIST``, ``EPICS_CAS_BEACON_ADDR_LIST``,
``EPICS_CAS_AUTO_BEACON_ADDR_LIST``, ``EPICS_CAS_BEACON_PERIOD``...). ::

    bridge = EpicsBridge(DeviceCoordinationClient(url, heartbeat=2.0), LockPVs("BL:", ["m1"]))
    await bridge.run()  # until cancelled
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from caproto import (
    AccessRights,
    AlarmSeverity,
    AlarmStatus,
    ChannelAlarm,
    ChannelInteger,
    ChannelString,
)
from caproto.asyncio.server import Context

from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.epics.pvnames import FREE, check_epics_device_name, check_prefix, holder_pv, lock_pv
from bs_coordination.errors import CoordinationError
from bs_coordination.models import DeviceLock

log = logging.getLogger(__name__)

#: How often the bridge checks its WebSocket connection (seconds): the longest a lost
#: connection goes unnoticed once the socket has closed.
WATCH_INTERVAL = 0.05
#: The longest ``:HOLDER`` value: a DBR_STRING holds 39 bytes and a terminating NUL.
MAX_HOLDER = 39


class _ReadOnlyInteger(ChannelInteger):
    """A LONG PV that Channel Access clients may read but never write."""

    def check_access(self, hostname: str, username: str) -> AccessRights:
        return AccessRights.READ


class _ReadOnlyString(ChannelString):
    """A STRING PV that Channel Access clients may read but never write."""

    def check_access(self, hostname: str, username: str) -> AccessRights:
        return AccessRights.READ


def _invalid() -> ChannelAlarm:
    return ChannelAlarm(status=AlarmStatus.COMM, severity=AlarmSeverity.INVALID_ALARM)


def holder_text(user_id: str) -> str:
    """``user_id`` as a Channel Access string holds it: Latin-1 (other characters become
    ``?``), at most ``MAX_HOLDER`` bytes."""
    return user_id.encode("latin-1", "replace")[:MAX_HOLDER].decode("latin-1")


def lock_shown(locks: Mapping[str, DeviceLock], device: str) -> DeviceLock | None:
    """The lock a root device's PVs show: its own active lock, else the highest-priority
    active lock on one of its components, else ``None`` (free)."""
    own = locks.get(device)
    if own is not None:
        return own
    below = device + "."
    components = [lock for name, lock in locks.items() if name.startswith(below)]
    return min(components, key=lambda lock: lock.priority, default=None)


class LockPVs:
    """The bridge's PV database: ``:LOCK`` and ``:HOLDER`` per device, INVALID at first."""

    def __init__(self, prefix: str, devices: Sequence[str]) -> None:
        if not devices:
            raise ValueError("no devices to serve")
        for device in devices:
            check_epics_device_name(device)
        self.prefix = check_prefix(prefix)
        self.devices = list(dict.fromkeys(devices))
        self.lock = {d: _ReadOnlyInteger(value=FREE, alarm=_invalid(),
                                         reported_record_type="longin") for d in self.devices}
        self.holder = {d: _ReadOnlyString(value="", alarm=_invalid(),
                                          reported_record_type="stringin") for d in self.devices}
        #: What each device's PVs show: ``(priority, holder)``; absent while INVALID.
        self.shown: dict[str, tuple[int, str]] = {}
        #: Set once the CA server listens; ``port`` is its TCP port then.
        self.listening = asyncio.Event()
        self.port: int | None = None

    @property
    def pvdb(self) -> dict[str, Any]:
        db: dict[str, Any] = {}
        for d in self.devices:
            db[lock_pv(self.prefix, d)] = self.lock[d]
            db[holder_pv(self.prefix, d)] = self.holder[d]
        return db

    async def show(self, device: str, lock: DeviceLock | None) -> None:
        """Publish ``lock`` (``None``: free) on the device's PVs, valid; no-op if unchanged."""
        value = (lock.priority, holder_text(lock.user_id)) if lock is not None else (FREE, "")
        if self.shown.get(device) == value:
            return
        self.shown[device] = value
        # HOLDER first: a client that sees the new LOCK reads the matching HOLDER.
        await self.holder[device].write(value[1], status=AlarmStatus.NO_ALARM,
                                        severity=AlarmSeverity.NO_ALARM)
        await self.lock[device].write(value[0], status=AlarmStatus.NO_ALARM,
                                      severity=AlarmSeverity.NO_ALARM)
        log.debug("%s: LOCK %d HOLDER %r", device, value[0], value[1])

    async def invalidate(self) -> None:
        """Every PV to INVALID severity (COMM status), keeping its last value."""
        self.shown.clear()
        for d in self.devices:
            await self.lock[d].write(self.lock[d].value, status=AlarmStatus.COMM,
                                     severity=AlarmSeverity.INVALID_ALARM)
        for d in self.devices:
            await self.holder[d].write(self.holder[d].value, status=AlarmStatus.COMM,
                                       severity=AlarmSeverity.INVALID_ALARM)

    async def serve(self) -> None:
        """Run the Channel Access server until cancelled."""

        async def started(_: Any) -> None:
            self.port = ctx.port
            self.listening.set()
            log.info("serving %d lock PVs over Channel Access on port %s (%s...)",
                     2 * len(self.devices), ctx.port, lock_pv(self.prefix, self.devices[0]))

        ctx = Context(self.pvdb)
        await ctx.run(startup_hook=started)


class EpicsBridge:
    """Keeps ``LockPVs`` in step with the service behind ``client``; see the module docstring.

    ``retry_delay`` is the wait between attempts while the service cannot be reached at start
    (afterwards the client's own reconnect backoff applies).
    """

    def __init__(self, client: DeviceCoordinationClient, pvs: LockPVs, *,
                 retry_delay: float = 1.0) -> None:
        self.client = client
        self.pvs = pvs
        self.retry_delay = retry_delay
        self._synced: int | None = None  # the client's reconnect count at the last status
        self._valid = False  # what the PVs show: in step (True) or INVALID (False)

    @property
    def in_step(self) -> bool:
        """True while the connection that delivered the last status is still open."""
        return self.client.websocket_connected and self._synced == self.client.reconnect_count

    async def run(self) -> None:
        """Serve the PVs and follow the service until cancelled."""
        self.client.add_status_callback(self._on_status)
        self.client.add_lock_update_callback(self._on_event)
        server = asyncio.create_task(self.pvs.serve(), name="bs-coordination-epics-ca-server")
        try:
            await self._connect()
            while not server.done():
                await self._watch()
                await asyncio.wait([server], timeout=WATCH_INTERVAL)
            server.result()  # the CA server failed: raise its error
        finally:
            self.client.remove_status_callback(self._on_status)
            self.client.remove_lock_update_callback(self._on_event)
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            await self.client.stop_websocket_monitoring()

    async def _connect(self) -> None:
        """Start monitoring, retrying while the service cannot be reached."""
        last = None
        while True:
            try:
                await self.client.start_websocket_monitoring()
                return
            except CoordinationError as exc:
                # Warn once per distinct failure, not at every retry of a long outage.
                level = logging.WARNING if str(exc) != last else logging.DEBUG
                last = str(exc)
                log.log(level, "cannot follow the coordination service (%s); lock PVs stay "
                        "INVALID; retrying every %.1f s", exc, self.retry_delay)
            await asyncio.sleep(self.retry_delay)

    async def _watch(self) -> None:
        in_step = self.in_step
        if in_step == self._valid:
            return
        if in_step:
            await self._refresh(self.pvs.devices)
        else:
            await self._lose()

    async def _lose(self) -> None:
        self._valid = False
        await self.pvs.invalidate()
        log.warning("lost the coordination service at %s: %d lock PVs INVALID until it is "
                    "back", self.client.base_url, len(self.pvs.devices))

    async def _refresh(self, devices: Iterable[str]) -> None:
        if not self.in_step:
            if self._valid:
                await self._lose()
            return
        locks: dict[str, DeviceLock] | None = None
        for device in devices:
            lock = self.client.get_cached_lock_status(device)
            if lock is None:  # free, or only components locked: look at every lock, once
                locks = self.client.get_all_cached_locks() if locks is None else locks
                lock = lock_shown(locks, device)
            await self.pvs.show(device, lock)
        if not self._valid:
            self._valid = True
            log.info("in step with the coordination service at %s: %d lock PVs valid",
                     self.client.base_url, len(self.pvs.devices))

    async def _on_status(self, locks: list[DeviceLock]) -> None:
        self._synced = self.client.reconnect_count
        self.pvs.shown.clear()  # write every PV: its value may be unchanged but INVALID
        await self._refresh(self.pvs.devices)

    async def _on_event(self, device_name: str, lock: DeviceLock, action: str) -> None:
        root = device_name.split(".", 1)[0]
        if self._valid and root in self.pvs.lock:
            await self._refresh([root])


__all__ = ["MAX_HOLDER", "WATCH_INTERVAL", "EpicsBridge", "LockPVs", "holder_text", "lock_shown"]
