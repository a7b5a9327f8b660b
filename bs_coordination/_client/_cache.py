"""The client's local copy of the active locks, kept by applying ``lock_update`` events.

Pure functions, no I/O. A record is identified by its device name and fencing token (every
grant, upgrade and restore carries a fresh token), so an event about a preempted lock never
removes the active lock that sits above it on the same device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bs_coordination.models import DeviceLock, LockState

#: Actions after which the event's lock (if active) holds its device.
HOLDING_ACTIONS = frozenset({"acquired", "restored", "renewed", "upgraded"})
#: Actions after which the event's lock no longer holds its device.
GONE_ACTIONS = frozenset({"released", "expired", "force_released", "consumed", "preempted"})


def snapshot(locks: Iterable[DeviceLock]) -> dict[str, DeviceLock]:
    """The active locks of a status listing, by device name."""
    return {lock.device_name: lock for lock in locks if lock.state == LockState.ACTIVE}


def apply_event(cache: dict[str, DeviceLock], action: str, lock: DeviceLock) -> None:
    """Update ``cache`` (device name -> active lock) in place for one event."""
    name = lock.device_name
    if action in HOLDING_ACTIONS:
        if lock.state == LockState.ACTIVE:
            cache[name] = lock
        else:
            _drop(cache, lock)  # e.g. a preempted lock renewed by its heartbeat
    elif action in GONE_ACTIONS:
        _drop(cache, lock)
    elif lock.state == LockState.ACTIVE:
        # An action this client does not know yet: trust the record's state.
        cache[name] = lock
    else:
        _drop(cache, lock)


def _drop(cache: dict[str, DeviceLock], lock: DeviceLock) -> None:
    current = cache.get(lock.device_name)
    if current is not None and current.token == lock.token:
        del cache[lock.device_name]


def covering(cache: Mapping[str, DeviceLock], device_name: str) -> DeviceLock | None:
    """The active lock on ``device_name`` or on one of its ancestors (``det1`` for
    ``det1.cam``), as the service's device status reports it."""
    lock = cache.get(device_name)
    if lock is not None:
        return lock
    parts = device_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        lock = cache.get(".".join(parts[:i]))
        if lock is not None:
            return lock
    return None


def event_order(event_id: str) -> tuple[int, ...] | None:
    """Sort key of an event id (``"12"`` or ``"1700000000000-3"``); ``None`` if unparseable."""
    try:
        return tuple(int(part) for part in event_id.split("-"))
    except (ValueError, AttributeError):
        return None


def is_after(event_id: str | None, mark: str | None) -> bool:
    """True if ``event_id`` comes after ``mark`` (or either is unknown: then deliver it)."""
    if event_id is None or mark is None:
        return True
    a, b = event_order(event_id), event_order(mark)
    if a is None or b is None:
        return event_id != mark
    return a > b


def is_before(event_id: str, mark: str) -> bool:
    """True if both ids parse and ``event_id`` comes strictly before ``mark``."""
    a, b = event_order(event_id), event_order(mark)
    return a is not None and b is not None and a < b
