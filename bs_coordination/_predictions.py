"""Devices of waiting queue items as the service's preflight predicts them (used by
``reservations``): each plan item is dry-run by ``POST /api/preflight`` when it appears or
changes, and again every ``RECHECK_SECONDS`` (with its ``item_uid``, so that the service's
``GET /api/preflight/items``, the dashboard's list of blocked waiting plans, stays current)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import (
    CoordinationError,
    InvalidRequestError,
    LockNotFoundError,
    ServiceError,
)

if TYPE_CHECKING:
    from bs_coordination.reservations import Reservation

log = logging.getLogger(__name__)

#: Seconds between two dry runs of an unchanged waiting item (the service lists an item it has
#: not checked for 30 s no more).
RECHECK_SECONDS = 10.0


class Predictions:
    """Predicted root devices per item uid, cached per item version.

    ``retry_unavailable``: seconds before asking again a service that has no preflight (no
    profile collection: 409; a service without the endpoint: 404)."""

    def __init__(self, client: DeviceCoordinationClient, retry_unavailable: float = 30.0) -> None:
        self.client = client
        self.retry_unavailable = float(retry_unavailable)
        #: uid -> (version, devices, when asked)
        self._cache: dict[str, tuple[str, frozenset[str], float]] = {}
        self._unavailable_until = -float("inf")

    async def add(self, items: Sequence[Mapping[str, Any]],
                  wanted: dict[str, Reservation]) -> None:
        """Add to ``wanted`` (item uid -> reservation) the predicted devices of each plan item
        of ``items``; forget the items that left the queue."""
        from bs_coordination.reservations import Reservation

        live: set[str] = set()
        for item in items:
            if item.get("item_type", "plan") != "plan" or not item.get("item_uid"):
                continue
            uid = str(item["item_uid"])
            live.add(uid)
            predicted = await self.devices(uid, item)
            if predicted:
                base = wanted.get(uid)
                devices = predicted | (base.devices if base else frozenset())
                wanted[uid] = Reservation(uid, str(item.get("name", "?")), devices)
        self._cache = {u: p for u, p in self._cache.items() if u in live}

    async def devices(self, uid: str, item: Mapping[str, Any]) -> frozenset[str]:
        """The root devices the service predicts for ``item`` (empty when it cannot say)."""
        plan = {"name": item.get("name"), "args": item.get("args") or [],
                "kwargs": item.get("kwargs") or {}}
        version = json.dumps(plan, sort_keys=True, default=str)
        cached = self._cache.get(uid)
        if cached is not None and cached[0] != version:
            cached = None  # the item changed: its last answer no longer holds
        now = time.monotonic()
        if cached is not None and now - cached[2] < RECHECK_SECONDS:
            return cached[1]
        if time.monotonic() < self._unavailable_until:
            return frozenset()
        try:
            answer = await self.client.preflight({**plan, "item_uid": uid})
        except InvalidRequestError as exc:  # a plan the collection does not know: arguments only
            log.info("no preflight for item %s: %s", uid, exc.message)
            self._cache[uid] = (version, frozenset(), now)
            return frozenset()
        except (ServiceError, LockNotFoundError) as exc:
            if exc.status_code in (404, 409):  # no collection, or a service without preflight
                self._unavailable_until = time.monotonic() + self.retry_unavailable
                log.info("the service has no preflight (%s); reserving argument devices only",
                         exc.message)
                return frozenset()
            log.warning("no preflight for item %s: %s", uid, exc.message)
            return cached[1] if cached is not None else frozenset()  # keep the last answer
        except CoordinationError as exc:  # unreachable, or 5xx: ask again at the next poll
            log.warning("no preflight for item %s: %s", uid, exc.message)
            return cached[1] if cached is not None else frozenset()
        devices = frozenset(str(d["device_name"]) for d in answer.get("devices") or [])
        self._cache[uid] = (version, devices, now)
        if not answer.get("complete") and cached is None:
            log.info("item %s: the dry run is incomplete (%s); reserving %s",
                     uid, answer.get("reason"), sorted(devices))
        return devices
