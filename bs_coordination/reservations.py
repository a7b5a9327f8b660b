"""Queue reservations: ``QUEUE_QUEUED`` locks for the devices of plans waiting in the queue.

A ``QueueReservations`` follows a Bluesky Queue Server (RE Manager) through
``bluesky-queueserver-api`` and keeps, for every plan item waiting in the queue, a
``QUEUE_QUEUED`` lock on the devices named in its parameters, with ``plan_uid`` = the item's
uid and a reason naming the plan. Run it as a command beside the RE Manager::

    bs-coordination-reserve --zmq-control-addr tcp://localhost:60615 \\
        --url http://localhost:60620            # or: python -m bs_coordination.reservations

How it follows the queue: every ``interval`` seconds it asks the RE Manager for its status;
``REManagerAPI.queue_get()`` fetches the queue again only when the status's
``plan_queue_uid`` changed (the API caches it), so an idle queue costs one small status
request per poll. The RE Manager has no push channel for queue changes; the status poll is
what ``bluesky-queueserver-api`` itself uses (``wait_for_idle``).

- Device names: strings in the item's ``args`` and ``kwargs`` (also inside lists and dicts)
  that are known device or component names; a component (``stage.coarse.x``) reserves its
  root device (``stage``), which is what the RunEngine plugin locks. Known names come from the
  lock service's ``/api/device-config/devices`` when it has discovered a profile collection,
  else from the RE Manager's ``devices_existing``.
- Predicted devices: when the service has a profile collection, each waiting item is also
  dry-run there once (``POST /api/preflight``, asked again only if the item changes), and the
  devices the dry run finds are reserved too: a device of the startup code that the plan
  moves without naming it in its arguments. Without a collection (409), for a plan the
  service does not know (422) or while the service cannot be asked, the argument devices
  alone are reserved.
- An item that leaves the queue (removed, or the queue cleared) drops its reservations.
- The running item keeps its reservations untouched: its plan's ``QUEUE_EXECUTING`` locks
  (sent with ``plan_uid`` = the item uid by the plugin) *consume* them (event ``consumed``), so
  nothing is restored after the plan. Whatever the plan did not consume is released when the
  item is no longer running.
- A reservation is the lowest priority: a device held by anyone else (an operator's
  ``MANUAL_OPERATOR`` lock, an earlier item's reservation) is simply not reserved now; the
  request is tried again on a later poll (every ``retry`` seconds). An operator who asks for a
  reserved device preempts the reservation.
- Leases (``lease`` seconds) are renewed every third of the lease while held; if the command
  dies, its reservations expire by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bs_coordination._predictions import Predictions
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import CoordinationError, LockNotFoundError
from bs_coordination.models import LockType, names_overlap

log = logging.getLogger(__name__)

DEFAULT_USER = "queue_reservations"


@dataclass(frozen=True)
class Reservation:
    """What one waiting queue item should hold: its root devices."""

    item_uid: str
    plan_name: str
    devices: frozenset[str]

    @property
    def reason(self) -> str:
        return f"queued plan '{self.plan_name}' (waiting in the queue)"


@dataclass
class _Held:
    """Reservations held for one item: device -> lock key."""

    plan_name: str
    keys: dict[str, str] = field(default_factory=dict)


# -- pure part: which devices an item names ------------------------------------------------
def strings_in(value: Any) -> Iterator[str]:
    """Every string in a plan parameter, also inside lists, tuples and dict values."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from strings_in(v)


def names_from_existing_devices(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Dotted names of an RE Manager device tree (``devices_existing``/``devices_allowed``:
    ``{name: {"classname": ..., "components": {...}}}``)."""
    names: set[str] = set()
    for name, info in tree.items():
        full = f"{prefix}{name}"
        names.add(full)
        components = info.get("components") if isinstance(info, Mapping) else None
        if isinstance(components, Mapping):
            names |= names_from_existing_devices(components, full + ".")
    return names


def names_from_device_list(devices: Iterable[Mapping[str, Any]]) -> set[str]:
    """Dotted names of the lock service's ``/api/device-config/devices`` list (root devices
    with their ``components``, whose ``name`` is already the dotted name)."""
    names: set[str] = set()
    for dev in devices:
        names.add(str(dev["name"]))
        names |= names_from_device_list(dev.get("components") or [])
    return names


def reservations_for(items: Sequence[Mapping[str, Any]], known: set[str]) -> dict[str, Reservation]:
    """The reservations the waiting ``items`` (queue order) call for: for each plan item, the
    root devices of the known device names among its parameters. Items naming none are left
    out; instructions (``queue_stop``) name none."""
    wanted: dict[str, Reservation] = {}
    for item in items:
        if item.get("item_type", "plan") != "plan" or not item.get("item_uid"):
            continue
        params = [*(item.get("args") or []), *(item.get("kwargs") or {}).values()]
        roots = {s.split(".", 1)[0] for s in strings_in(params) if s in known}
        if roots:
            uid = str(item["item_uid"])
            wanted[uid] = Reservation(uid, str(item.get("name", "?")), frozenset(roots))
    return wanted


# -- the component -------------------------------------------------------------------------
class QueueReservations:
    """Keeps ``QUEUE_QUEUED`` locks in step with an RE Manager's queue.

    ``manager`` is a ``bluesky_queueserver_api.zmq.aio.REManagerAPI`` (or the HTTP variant);
    ``client`` a ``DeviceCoordinationClient``. ``known_devices`` fixes the device names (else
    they come from the service's discovery, then from the RE Manager). Use ``await sync()``
    for one step, or ``await run(stop)`` to follow the queue until ``stop`` is set; ``await
    close()`` releases every reservation held.

    ::

        async with DeviceCoordinationClient(url) as client:
            reserver = QueueReservations(REManagerAPI(zmq_control_addr=addr), client)
            await reserver.run(stop_event)
    """

    def __init__(self, manager: Any, client: DeviceCoordinationClient, *,
                 user_id: str = DEFAULT_USER, lease: float = 60.0, interval: float = 0.5,
                 retry: float = 2.0, known_devices: Iterable[str] | None = None,
                 devices_refresh: float = 30.0, preflight: bool = True) -> None:
        if lease <= 0:
            raise ValueError("lease must be > 0")
        self.manager = manager
        self.client = client
        self.user_id = user_id
        self.lease = float(lease)
        self.interval = float(interval)
        self.retry = float(retry)
        self.devices_refresh = float(devices_refresh)
        self._fixed_known = set(known_devices) if known_devices is not None else None
        self._service_known: set[str] | None = None
        self._service_known_at = -float("inf")
        self._held: dict[str, _Held] = {}
        self._renewed: dict[str, float] = {}  # lock key -> monotonic time of grant/renewal
        self._refused: dict[str, float] = {}  # item uid -> when its last request was refused
        self._queue_uid: str | None = None
        #: Dry runs through the service's preflight (``preflight=False``: argument names only).
        self.preflight = preflight
        self._predictions = Predictions(client, retry_unavailable=devices_refresh)
        #: Completed ``sync()`` steps (tests wait on it).
        self.syncs = 0

    # -- public view -----------------------------------------------------------------------
    def reserved(self) -> dict[str, set[str]]:
        """Item uid -> devices reserved for it now (as far as this component knows)."""
        return {uid: set(h.keys) for uid, h in self._held.items() if h.keys}

    # -- one step --------------------------------------------------------------------------
    async def sync(self) -> None:
        """Read the queue once and bring the reservations in line with it."""
        queue = await self.manager.queue_get(reload=True)
        items = list(queue.get("items") or [])
        running = queue.get("running_item") or {}
        running_uid = running.get("item_uid")
        queue_uid = queue.get("plan_queue_uid")
        if queue_uid != self._queue_uid:
            self._queue_uid = queue_uid
            self._refused.clear()  # the queue changed: try every item again now
        wanted = reservations_for(items, await self.known_devices())
        if self.preflight:
            await self._predictions.add(items, wanted)
        await self._drop(wanted, running_uid)
        await self._renew()
        await self._acquire(wanted)
        self.syncs += 1

    async def known_devices(self) -> set[str]:
        """Device and component names that count as devices in plan parameters."""
        if self._fixed_known is not None:
            return self._fixed_known
        now = time.monotonic()
        if now - self._service_known_at >= self.devices_refresh:
            self._service_known_at = now
            self._service_known = await self._devices_from_service()
        if self._service_known:
            return self._service_known
        answer = await self.manager.devices_existing()
        return names_from_existing_devices(answer.get("devices_existing") or {})

    async def _devices_from_service(self) -> set[str] | None:
        try:
            # The client has no method for the device-config API (it is the original
            # service's optional part): ask through its transport, with its key.
            status, body = await self.client._http.request("GET", "/api/device-config/devices")
        except CoordinationError as exc:
            log.debug("no device list from the service: %s", exc)
            return None
        if status != 200 or not isinstance(body, dict):
            return None
        return names_from_device_list(body.get("devices") or []) or None

    async def _drop(self, wanted: dict[str, Reservation], running_uid: str | None) -> None:
        for uid in list(self._held):
            if uid == running_uid:
                continue  # its plan's QUEUE_EXECUTING locks consume these
            held, want = self._held[uid], wanted.get(uid)
            for dev in [d for d in held.keys if want is None or d not in want.devices]:
                await self._release(dev, held.keys.pop(dev), uid)
            if want is None and not held.keys:
                del self._held[uid]
        self._refused = {u: t for u, t in self._refused.items() if u in wanted}

    async def _release(self, device: str, key: str, uid: str) -> None:
        try:
            await self.client.release_lock(device, key, self.user_id)
            log.info("reservation of %r for item %s released", device, uid)
        except LockNotFoundError:
            pass  # consumed by the plan, expired, or force-released: gone either way
        except CoordinationError as exc:
            log.warning("could not release the reservation of %r for item %s: %s",
                        device, uid, exc)
        if not any(key in h.keys.values() for h in self._held.values()):
            self._renewed.pop(key, None)

    async def _renew(self) -> None:
        now = time.monotonic()
        for key, at in list(self._renewed.items()):
            if now - at < self.lease / 3:
                continue
            try:
                await self.client.renew_lock(key, self.lease)
                self._renewed[key] = now
            except LockNotFoundError:
                self._forget(key)  # consumed, expired or force-released
            except CoordinationError as exc:
                log.warning("could not renew a reservation: %s", exc)

    def _forget(self, key: str) -> None:
        self._renewed.pop(key, None)
        for held in self._held.values():
            for dev in [d for d, k in held.keys.items() if k == key]:
                del held.keys[dev]

    async def _acquire(self, wanted: dict[str, Reservation]) -> None:
        now = time.monotonic()
        for uid, want in wanted.items():
            held = self._held.setdefault(uid, _Held(want.plan_name))
            missing = sorted(want.devices - set(held.keys))
            if not missing or now - self._refused.get(uid, -float("inf")) < self.retry:
                continue
            conflicts = await self._request(want, missing)
            if not conflicts:
                continue  # granted, or the service could not be asked (next poll)
            self._refused[uid] = now
            free = [d for d in missing if not any(names_overlap(d, c) for c in conflicts)]
            if free:
                # Some devices are taken (an operator, an earlier item): reserve the rest now.
                await self._request(want, free)

    async def _request(self, want: Reservation, devices: list[str]) -> list[str] | None:
        """Request ``devices`` for ``want``; ``[]`` when granted, the conflicting device names
        when refused, ``None`` when the service could not be asked."""
        try:
            answer = await self.client.request_locks(
                devices, LockType.QUEUE_QUEUED, self.user_id, timeout=self.lease,
                reason=want.reason, plan_uid=want.item_uid)
        except CoordinationError as exc:
            log.warning("could not reserve %s for item %s: %s", devices, want.item_uid, exc)
            return None
        if not answer.success or answer.lock_key is None:
            log.debug("reservation of %s for item %s refused: %s", devices, want.item_uid,
                      answer.message)
            return [c.device_name for c in answer.conflicts] or list(devices)
        held = self._held.setdefault(want.item_uid, _Held(want.plan_name))
        for dev in devices:
            held.keys[dev] = answer.lock_key
        self._renewed[answer.lock_key] = time.monotonic()
        log.info("reserved %s for item %s (%s)", devices, want.item_uid, want.plan_name)
        return []

    # -- running ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """``sync()`` every ``interval`` seconds until ``stop`` is set (or the task is
        cancelled), then release every reservation. A failed step (RE Manager or service
        unreachable) is logged and tried again."""
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    await self.sync()
                except Exception as exc:  # a follower outlives a failed step
                    # The RE Manager or the service is away (timeouts, refused requests): keep
                    # what is held (leases bound it) and try again at the next poll.
                    log.warning("queue reservations: sync failed: %s: %s",
                                type(exc).__name__, exc)
                try:
                    await asyncio.wait_for(stop.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.close()

    async def close(self) -> None:
        """Release every reservation this component holds."""
        keys = set(self._renewed)
        self._held.clear()
        self._renewed.clear()
        for key in keys:
            try:
                await self.client.release_lock(None, key, self.user_id)
            except CoordinationError:
                pass  # consumed or expired already


# -- command -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="bs-coordination-reserve",
        description="Keep QUEUE_QUEUED reservations on the devices of plans waiting in a "
                    "Bluesky Queue Server's queue.")
    p.add_argument("--zmq-control-addr", default=env("QSERVER_ZMQ_CONTROL_ADDRESS"),
                   help="RE Manager control address (default: the API's, "
                        "tcp://localhost:60615; env QSERVER_ZMQ_CONTROL_ADDRESS)")
    p.add_argument("--url", default=env("COORDINATION_URL", "http://localhost:60620"),
                   help="the lock service (env COORDINATION_URL)")
    p.add_argument("--user", default=env("COORDINATION_RESERVE_USER", DEFAULT_USER),
                   help=f"user_id of the reservations (default {DEFAULT_USER})")
    p.add_argument("--lease", type=float, default=60.0, help="lease in seconds (default 60)")
    p.add_argument("--interval", type=float, default=0.5,
                   help="seconds between queue polls (default 0.5)")
    p.add_argument("--log-level", default=env("COORDINATION_LOG_LEVEL", "INFO"))
    return p


async def _main(args: argparse.Namespace) -> None:
    from bluesky_queueserver_api.zmq.aio import REManagerAPI

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    kwargs = {"zmq_control_addr": args.zmq_control_addr} if args.zmq_control_addr else {}
    manager = REManagerAPI(**kwargs)
    try:
        async with DeviceCoordinationClient(
                args.url, api_key=os.environ.get("COORDINATION_API_KEY") or None) as client:
            reserver = QueueReservations(manager, client, user_id=args.user, lease=args.lease,
                                         interval=args.interval)
            log.info("following the queue at %s; reservations as %r at %s",
                     args.zmq_control_addr or "the default address", args.user, args.url)
            await reserver.run(stop)
    finally:
        await manager.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``bs-coordination-reserve``: run ``QueueReservations`` until SIGINT/SIGTERM."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_main(args))
    except CoordinationError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
