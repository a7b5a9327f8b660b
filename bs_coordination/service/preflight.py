"""Preflight: the devices a queued plan will touch, predicted by a dry run, and the locks in
its way.

A dry run loads the profile collection in a **child process** (``_preflight_worker``, run by
file path as the discovery worker is) and drives the plan's messages through bluesky's
``RunEngineSimulator``; nothing is sent to a device, and the service process never imports
bluesky. Loading a collection takes seconds, so the child stays **warm**: it is started at the
first preflight and then serves one dry run after another (one at a time), and is started again
when discovery loads a new device list.

Nothing a plan does can hang or crash the service:

- each dry run has a time limit (``--preflight-timeout``, default 10 s); the child interrupts a
  plan that runs past it and answers ``complete: false`` with the reason;
- if the child does not answer within the limit plus ``KILL_GRACE`` seconds (a plan stuck in C
  code), or dies (a plan that ends the process), it is killed, the answer is ``complete: false``
  saying so, with the argument devices the child reported before the dry run began, and a
  fresh child is started in the background.

The lock side (``conflicts``) is computed here, from the store: every lock on a predicted
device (its own, or one on a component) that a ``QUEUE_EXECUTING`` request would not preempt,
that is MAINTENANCE or an equal-priority (QUEUE_EXECUTING) holder, active or preempted.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bs_coordination.errors import DiscoveryError, InvalidRequestError
from bs_coordination.models import MAX_NAME_LENGTH, DeviceLock, LockType
from bs_coordination.stores import Store

from .preflight_runner import DEFAULT_PREFLIGHT_TIMEOUT, PreflightRunner

log = logging.getLogger(__name__)

#: Deepest nesting of lists and objects accepted in an item's arguments (plans take lists of
#: devices, perhaps of lists: a few levels).
MAX_ARGUMENT_DEPTH = 32


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (0 for a plain value), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (list, dict)):
            if d + 1 > MAX_ARGUMENT_DEPTH:
                return d + 1
            deepest = max(deepest, d + 1)
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


# --------------------------------------------------------------------------- models


class QueueItem(BaseModel):
    """A plan item as the queue server writes it (``item_uid``, ``user``... are accepted and
    ignored)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="Plan name.")
    args: list[Any] = Field(default_factory=list, description="Positional arguments; device "
                            "names are resolved to devices as the queue server does.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")
    item_type: str = Field(default="plan", description="Only `plan` items can be dry-run.")

    @field_validator("args", "kwargs")
    @classmethod
    def _not_too_deep(cls, value: Any) -> Any:
        if _depth(value) > MAX_ARGUMENT_DEPTH:
            raise ValueError(f"nested deeper than {MAX_ARGUMENT_DEPTH} levels")
        return value
    item_uid: str | None = Field(
        default=None, max_length=MAX_NAME_LENGTH,
        description="The queue item's uid: the answer is remembered for a while and listed by "
        "`GET /api/preflight/items` (the dashboard's blocked waiting plans).")


class PreflightRequest(BaseModel):
    """``{"item": {"name": "scan", "args": [["det1"], "motor1", -1, 1, 5], "kwargs": {}}}``."""

    model_config = ConfigDict(extra="forbid")

    item: QueueItem


class DeviceSource(str, Enum):
    """``argument``: named in the item's arguments; ``dry_run``: found only by the dry run
    (a device of the startup namespace, a baseline reading...)."""

    ARGUMENT = "argument"
    DRY_RUN = "dry_run"


class Incomplete(str, Enum):
    """Why a dry run did not finish: the plan needs real readings (adaptive), it ran past its
    time limit, or it raised."""

    NEEDS_READINGS = "needs_readings"
    TIME_LIMIT = "time_limit"
    EXCEPTION = "exception"


class PredictedDevice(BaseModel):
    """A root device the plan will lock (the name the RunEngine plugin locks it under)."""

    device_name: str
    source: DeviceSource
    commands: list[str] = Field(default_factory=list,
                                description="Message commands the dry run sent it (`set`...).")


class PreflightConflict(BaseModel):
    """A predicted device held now by someone a QUEUE_EXECUTING request would not preempt."""

    device_name: str = Field(description="The predicted device.")
    lock: DeviceLock = Field(description="The holder's public record (on the device or on a "
                             "component of it).")


class PreflightResponse(BaseModel):
    """What the plan will touch and whether it could start now."""

    plan: str
    devices: list[PredictedDevice]
    complete: bool = Field(description="The dry run finished: `devices` is the whole set.")
    reason: str | None = Field(default=None, description="Why the dry run is incomplete; the "
                               "argument devices still count.")
    incomplete: Incomplete | None = None
    conflicts: list[PreflightConflict]
    can_start: bool = Field(description="No predicted device is held by MAINTENANCE or an "
                            "equal-priority holder.")
    messages: int = Field(description="Messages the plan yielded in the dry run.")
    duration_s: float = Field(description="How long the preflight took in the service.")


class CheckedItem(BaseModel):
    """A queue item preflight checked recently, with the locks in its way now."""

    item_uid: str
    plan: str
    devices: list[PredictedDevice]
    complete: bool
    reason: str | None = None
    conflicts: list[PreflightConflict]
    can_start: bool
    checked_at: datetime = Field(description="When its dry run was answered.")


class CheckedItemsResponse(BaseModel):
    """Queue items checked within the last ``RECENT_SECONDS`` (newest first)."""

    items: list[CheckedItem]
    total_count: int
    timestamp: datetime


# --------------------------------------------------------------------------- the lock side


async def conflicts_for(store: Store, device_names: list[str]) -> list[PreflightConflict]:
    """Locks on ``device_names`` (or their components) that a QUEUE_EXECUTING request would not
    preempt: MAINTENANCE or QUEUE_EXECUTING, active or preempted."""
    limit = LockType.QUEUE_EXECUTING.priority
    found: list[PreflightConflict] = []
    seen: set[tuple[str, int]] = set()
    for name in device_names:
        status = await store.device_status(name)
        locks = [status.lock, *status.preempted, *status.component_locks]
        for lock in locks:
            if lock is None or lock.priority > limit or (lock.device_name, lock.token) in seen:
                continue
            seen.add((lock.device_name, lock.token))
            found.append(PreflightConflict(device_name=name, lock=lock))
    return found


#: How long a checked queue item stays listed without being checked again (the reserver
#: checks each waiting item every ``bs_coordination._predictions.RECHECK_SECONDS``).
RECENT_SECONDS = 30.0
#: Most items remembered.
MAX_CHECKED = 1000


class CheckedItems:
    """Recent preflight answers of queue items, by item uid (this replica's memory: what the
    dashboard shows as waiting plans that would be blocked)."""

    def __init__(self, ttl: float = RECENT_SECONDS) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, datetime, PreflightResponse]] = {}

    def remember(self, uid: str, answer: PreflightResponse) -> None:
        self._items.pop(uid, None)
        self._items[uid] = (time.monotonic(), datetime.now(timezone.utc), answer)
        while len(self._items) > MAX_CHECKED:
            del self._items[next(iter(self._items))]

    async def current(self, store: Store) -> CheckedItemsResponse:
        """The items checked within ``ttl`` seconds, their conflicts as the lock table is now."""
        now = time.monotonic()
        self._items = {u: v for u, v in self._items.items() if now - v[0] <= self.ttl}
        items = []
        for uid, (_, at, answer) in reversed(self._items.items()):
            conflicts = await conflicts_for(store, [d.device_name for d in answer.devices])
            items.append(CheckedItem(
                item_uid=uid, plan=answer.plan, devices=answer.devices,
                complete=answer.complete, reason=answer.reason, conflicts=conflicts,
                can_start=not conflicts, checked_at=at))
        return CheckedItemsResponse(items=items, total_count=len(items),
                                    timestamp=datetime.now(timezone.utc))


async def preflight(runner: PreflightRunner, store: Store, item: QueueItem,
                    checked: CheckedItems | None = None) -> PreflightResponse:
    """Dry-run ``item`` and join its devices to the lock table."""
    started = time.perf_counter()
    if not runner.configured:
        raise DiscoveryError("preflight needs a profile collection: start the service with "
                             "--profile-collection PATH", status_code=409)
    if item.item_type != "plan":
        raise InvalidRequestError(f"item.item_type: only plans can be dry-run, got "
                                  f"{item.item_type!r}")
    # Only what the dry run uses (extra fields of the item, such as `meta`, are not serialized).
    answer = await runner.dry_run({"name": item.name, "args": item.args, "kwargs": item.kwargs})
    devices = [PredictedDevice.model_validate(d) for d in answer.get("devices") or []]
    conflicts = await conflicts_for(store, [d.device_name for d in devices])
    incomplete = answer.get("incomplete")
    response = PreflightResponse(
        plan=item.name, devices=devices, complete=bool(answer.get("complete")),
        reason=answer.get("reason"), incomplete=Incomplete(incomplete) if incomplete else None,
        conflicts=conflicts, can_start=not conflicts, messages=int(answer.get("messages") or 0),
        duration_s=round(time.perf_counter() - started, 6))
    if checked is not None and item.item_uid:
        checked.remember(item.item_uid, response)
    return response


__all__ = [
    "DEFAULT_PREFLIGHT_TIMEOUT",
    "CheckedItem",
    "CheckedItems",
    "CheckedItemsResponse",
    "DeviceSource",
    "Incomplete",
    "PredictedDevice",
    "PreflightConflict",
    "PreflightRequest",
    "PreflightResponse",
    "QueueItem",
    "conflicts_for",
    "preflight",
]
