"""``DeviceCoordinationClient``: the lock service over HTTP and WebSocket (aiohttp)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

from bs_coordination._client import _cache
from bs_coordination._client._http import NO_ANSWER, HttpTransport, error_for, message_of
from bs_coordination._client._lease import LeaseKeeper
from bs_coordination._client._monitor import (
    LockCallback,
    LockMonitor,
    MessageCallback,
    StatusCallback,
)
from bs_coordination.errors import LockNotFoundError, ServiceError
from bs_coordination.models import (
    AckResponse,
    DeviceLock,
    EventsResponse,
    ForceReleaseResponse,
    LockResponse,
    LocksStatusResponse,
    LockStatus,
    LockType,
    RenewResponse,
)

log = logging.getLogger(__name__)

#: Header naming a lock request, so a retry gets the same grant (IETF httpapi draft's name).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Times a lock request whose answer was lost is sent again (with its Idempotency-Key).
LOCK_REQUEST_RETRIES = 2
#: Pause before a retry, times the attempt number (seconds).
RETRY_DELAY = 0.2

T = TypeVar("T")
#: Seconds a preflight may take beyond the request timeout: its first dry run loads the
#: profile collection in the service's child process.
PREFLIGHT_EXTRA_TIME = 60.0


def _type_value(lock_type: LockType | str) -> str:
    return lock_type.value if isinstance(lock_type, LockType) else str(lock_type)


def default_ws_url(base_url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/ws`` (``https`` -> ``wss``)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + "/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + "/ws"
    return base + "/ws"


class DeviceCoordinationClient:
    """Client of the device coordination service.

    ::

        async with DeviceCoordinationClient("http://localhost:60620") as client:
            response = await client.request_lock("det1", LockType.MANUAL_OPERATOR, "alice",
                                                 reason="alignment")
            if response.success:
                ...
                await client.release_lock("det1", response.lock_key, "alice")
            else:
                print(response.message, response.conflicts)

    A refused request is ``LockResponse(success=False, conflicts=[holders])``, never an
    exception. Other failures raise ``bs_coordination.errors`` classes: ``LockNotOwnedError``
    (403), ``LockNotFoundError`` (404), ``InvalidRequestError`` (422), ``StoreUnavailableError``
    (503), ``ServiceError`` (anything else; ``status_code`` 0 when no answer came).

    ``api_key`` is sent as ``Authorization: ApiKey <key>`` on every request and the WebSocket.
    ``reconnect_delay``/``max_reconnect_delay`` bound the WebSocket reconnect backoff;
    ``heartbeat`` is the WebSocket ping interval that detects a dead connection.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:60620",
        ws_url: str | None = None,
        timeout: float = 30,
        api_key: str | None = None,
        *,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 10.0,
        heartbeat: float | None = 20.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ws_url = ws_url or default_ws_url(self.base_url)
        self.timeout = float(timeout)
        self._http = HttpTransport(self.base_url, self.timeout, api_key)
        self._monitor = LockMonitor(self._http, self.ws_url, reconnect_delay=reconnect_delay,
                                    max_reconnect_delay=max_reconnect_delay, heartbeat=heartbeat)
        self._background: set[asyncio.Task[Any]] = set()
        self._keepers: set[LeaseKeeper] = set()

    def __repr__(self) -> str:  # never show the API key
        return f"<DeviceCoordinationClient {self.base_url}>"

    # -- connection ----------------------------------------------------------------------
    async def __aenter__(self) -> DeviceCoordinationClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.disconnect()

    @property
    def connected(self) -> bool:
        """True between ``connect()`` (or the first request) and ``disconnect()``."""
        return self._http.is_open

    async def connect(self) -> None:
        """Open the HTTP session and check that the service answers.

        Any answer counts (a service that is up but not ready yet still takes requests when it
        becomes ready); ``ServiceError`` if nothing answers at ``base_url``.
        """
        self._http.open()
        try:
            status, body = await self._http.request("GET", "/api/health/ready")
        except ServiceError as exc:
            await self._http.close()
            raise ServiceError(
                f"cannot connect to the coordination service at {self.base_url}: {exc.message}",
                status_code=NO_ANSWER) from exc
        if status != 200:
            log.warning("coordination service at %s is not ready (HTTP %s: %s)", self.base_url,
                        status, message_of(status, body))

    async def disconnect(self) -> None:
        """Stop monitoring and lease heartbeats, finish releases still under way, close the
        session."""
        await self._monitor.stop()
        keepers, self._keepers = list(self._keepers), set()
        for keeper in keepers:
            await keeper.stop()
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self._http.close()

    async def health_check(self) -> dict[str, Any]:
        """The service's readiness answer, with ``ready`` (bool) added when it lacks one.

        Raises ``ServiceError`` only when the service does not answer at all.
        """
        status, body = await self._http.request("GET", "/api/health/ready")
        result: dict[str, Any] = dict(body) if isinstance(body, dict) else {"detail": body}
        result.setdefault("ready", status == 200)
        return result

    # -- locks ---------------------------------------------------------------------------
    async def request_lock(
        self,
        device_name: str,
        lock_type: LockType | str,
        user_id: str,
        timeout: float | None = 300,
        reason: str | None = None,
        plan_uid: str | None = None,
        wait: float = 0,
        lock_key: str | None = None,
        acknowledge_preemption: bool = False,
    ) -> LockResponse:
        """Lock one device. ``timeout`` is the lease in seconds (``None``: no expiry, allowed
        for MAINTENANCE and MANUAL_OPERATOR only); ``wait`` queues the request up to that many
        seconds; ``lock_key`` upgrades or extends an existing lock.
        ``acknowledge_preemption``: this holder will call ``acknowledge_preemption()`` once it
        has stopped using a device a higher priority took (the preemption handshake).

        Returns ``LockResponse``: ``success`` with ``lock_key`` and ``token``, or
        ``success=False`` with the holders in ``conflicts``. A grant that preempted holders
        says in ``acknowledged`` whether they all acknowledged in time.
        """
        body: dict[str, Any] = {"device_name": device_name}
        return await self._request(body, lock_type, user_id, timeout, reason, plan_uid, wait,
                                   lock_key, acknowledge_preemption)

    async def request_locks(
        self,
        device_names: Sequence[str],
        lock_type: LockType | str,
        user_id: str,
        timeout: float | None = 300,
        reason: str | None = None,
        plan_uid: str | None = None,
        wait: float = 0,
        lock_key: str | None = None,
        acknowledge_preemption: bool = False,
    ) -> LockResponse:
        """Lock several devices at once under one key: all of them, or none (one request)."""
        body: dict[str, Any] = {"device_names": list(device_names)}
        return await self._request(body, lock_type, user_id, timeout, reason, plan_uid, wait,
                                   lock_key, acknowledge_preemption)

    async def _request(self, body: dict[str, Any], lock_type: LockType | str, user_id: str,
                       timeout: float | None, reason: str | None, plan_uid: str | None,
                       wait: float, lock_key: str | None,
                       acknowledge_preemption: bool = False) -> LockResponse:
        body.update(lock_type=_type_value(lock_type), user_id=user_id, timeout=timeout)
        # Optional fields only when set, so the original service (which knows none of
        # ``wait``/``lock_key``) keeps understanding the request.
        for name, value in (("reason", reason), ("plan_uid", plan_uid), ("lock_key", lock_key)):
            if value is not None:
                body[name] = value
        if wait:
            body["wait"] = wait
        if acknowledge_preemption:
            body["acknowledge_preemption"] = True
        # A new lock carries an Idempotency-Key: a request whose answer was lost (the
        # connection dropped, the service crashed after committing, its store's reply was
        # lost: 503) is sent again with it, and gets the same grant instead of a conflict
        # with itself or a second lock.
        key = secrets.token_urlsafe(24) if lock_key is None else None
        headers = {IDEMPOTENCY_HEADER: key} if key is not None else None
        for attempt in range(LOCK_REQUEST_RETRIES + 1):
            try:
                status, answer = await self._http.request(
                    "POST", "/api/lock/request", json_body=body, extra_time=float(wait or 0),
                    headers=headers)
            except ServiceError as exc:
                if exc.status_code != NO_ANSWER or key is None or attempt == LOCK_REQUEST_RETRIES:
                    raise
                log.warning("lock request: no answer (%s); sending it again", exc.message)
            else:
                if status != 503 or key is None or attempt == LOCK_REQUEST_RETRIES:
                    break
                log.warning("lock request: %s; sending it again", message_of(status, answer))
            await asyncio.sleep(RETRY_DELAY * (attempt + 1))
        if status == 200 and isinstance(answer, dict):
            return LockResponse.model_validate(answer)
        if status == 409:
            conflicts = answer.get("conflicts", []) if isinstance(answer, dict) else []
            return LockResponse(success=False, message=message_of(status, answer),
                                conflicts=[DeviceLock.model_validate(c) for c in conflicts])
        raise error_for(status, answer, "lock request")

    async def release_lock(self, device_name: str | None, lock_key: str,
                           user_id: str | None = None) -> dict[str, Any]:
        """Release ``device_name`` held under ``lock_key`` (``None``: every device of the key).

        Returns the service's answer (``success``, ``message``, ``released``). Raises
        ``LockNotOwnedError`` if the device is locked under another key and
        ``LockNotFoundError`` if the key holds nothing there.
        """
        body: dict[str, Any] = {"lock_key": lock_key}
        if device_name is not None:
            body["device_name"] = device_name
        if user_id is not None:
            body["user_id"] = user_id
        status, answer = await self._http.request("POST", "/api/lock/release", json_body=body)
        if status == 200:
            return answer if isinstance(answer, dict) else {"success": True, "detail": answer}
        raise error_for(status, answer, "release")

    async def acknowledge_preemption(self, lock_key: str, device_name: str | None = None,
                                     ) -> AckResponse:
        """Say that this holder stopped using its preempted ``device_name`` (every preempted
        device of ``lock_key`` when ``None``): the preemptor, whose answer waits for this, is
        answered. Only for locks taken with ``acknowledge_preemption=True``.

        Raises ``LockNotFoundError`` when the key holds nothing (there), ``LockNotOwnedError``
        when the device is locked under another key."""
        body: dict[str, Any] = {"lock_key": lock_key}
        if device_name is not None:
            body["device_name"] = device_name
        status, answer = await self._http.request("POST", "/api/lock/ack", json_body=body)
        if status == 200 and isinstance(answer, dict):
            return AckResponse.model_validate(answer)
        raise error_for(status, answer, "acknowledge preemption")

    async def renew_lock(self, lock_key: str, timeout: float | None = 300) -> RenewResponse:
        """Set every lock of ``lock_key`` to end ``timeout`` seconds from now (this replaces
        the lease: a shorter ``timeout`` than the time left shortens it).

        Raises ``LockNotFoundError`` when the key holds nothing (released or expired)."""
        status, answer = await self._http.request(
            "POST", "/api/lock/renew", json_body={"lock_key": lock_key, "timeout": timeout})
        if status == 200 and isinstance(answer, dict):
            response = RenewResponse.model_validate(answer)
            if not response.success:
                raise LockNotFoundError(response.message)
            return response
        raise error_for(status, answer, "renew")

    async def force_release(self, device_name: str, reason: str | None = None,
                            user_id: str | None = None) -> ForceReleaseResponse:
        """Remove every lock on exactly ``device_name`` (an administrator's operation).
        ``user_id`` names who does it in the events (with API keys, the key's principal)."""
        body: dict[str, Any] = {"device_name": device_name}
        if reason is not None:
            body["reason"] = reason
        if user_id is not None:
            body["user_id"] = user_id
        status, answer = await self._http.request("POST", "/api/lock/force-release",
                                                  json_body=body)
        if status == 200 and isinstance(answer, dict):
            return ForceReleaseResponse.model_validate(answer)
        raise error_for(status, answer, "force release")

    def keep_alive(self, lock_key: str, timeout: float = 300,
                   interval: float | None = None) -> LeaseKeeper:
        """Start renewing ``lock_key``'s lease every ``interval`` (default ``timeout / 3``)
        seconds; returns the running ``LeaseKeeper`` (``await keeper.stop()``, or use it as
        ``async with``). It logs failed renewals and stops by itself when the lock is gone;
        ``disconnect`` stops it too. Call it from inside the running event loop."""
        keeper = LeaseKeeper(self.renew_lock, lock_key, timeout, interval)
        self._keepers = {k for k in self._keepers if k.running}
        self._keepers.add(keeper)
        return keeper

    # -- status --------------------------------------------------------------------------
    async def get_lock_status(self, device_name: str) -> LockStatus:
        """The device's active lock (its own or an ancestor's), what waits under it, and the
        locks on its components."""
        path = "/api/locks/device/" + quote(device_name, safe="")
        status, answer = await self._http.request("GET", path)
        if status == 200 and isinstance(answer, dict):
            return LockStatus.model_validate(answer)
        raise error_for(status, answer, "device status")

    async def get_all_locks(self) -> LocksStatusResponse:
        """Every lock, active and preempted."""
        status, answer = await self._http.request("GET", "/api/locks/status")
        if status == 200 and isinstance(answer, dict):
            return LocksStatusResponse.model_validate(answer)
        raise error_for(status, answer, "status")

    async def get_events(self, since: str | None = None) -> EventsResponse:
        """The event history after ``since`` (all retained events when ``None``)."""
        params = {"since": since} if since is not None else None
        status, answer = await self._http.request("GET", "/api/events", params=params)
        if status == 200 and isinstance(answer, dict):
            return EventsResponse.model_validate(answer)
        raise error_for(status, answer, "events")

    async def get_devices(self, device_type: str | None = None) -> dict[str, Any]:
        """The devices the service discovered in its profile collection (``devices``,
        ``total_count``, ``source``), only those of ``device_type`` when given.

        Raises ``LockNotFoundError`` when the service has no device discovery (HTTP 404)."""
        params = {"device_type": device_type} if device_type else None
        status, answer = await self._http.request("GET", "/api/device-config/devices",
                                                  params=params)
        if status == 200 and isinstance(answer, dict):
            return answer
        raise error_for(status, answer, "devices")

    async def get_device_config_status(self) -> dict[str, Any]:
        """Where the device list came from and how the last discovery went (``configured``,
        ``ready``, ``path``, ``last_error``...)."""
        status, answer = await self._http.request("GET", "/api/device-config/status")
        if status == 200 and isinstance(answer, dict):
            return answer
        raise error_for(status, answer, "device discovery status")

    async def preflight(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """Dry-run a queue item on the service (``POST /api/preflight``): the root devices its
        plan will touch (``devices``, each with ``source`` ``argument`` or ``dry_run``),
        ``complete``/``reason``, the locks in its way (``conflicts``) and ``can_start``.

        ``item`` is a plan item as the queue server writes it (``name``, ``args``,
        ``kwargs``). Raises ``InvalidRequestError`` for an unknown plan or arguments that do
        not bind, ``ServiceError`` (409) when the service has no profile collection."""
        status, answer = await self._http.request(
            "POST", "/api/preflight", json_body={"item": dict(item)},
            extra_time=PREFLIGHT_EXTRA_TIME)
        if status == 200 and isinstance(answer, dict):
            return answer
        raise error_for(status, answer, "preflight")

    async def is_device_locked(self, device_name: str) -> bool:
        """True if an active lock holds the device (or one of its ancestors)."""
        return (await self.get_lock_status(device_name)).locked

    async def can_access_device(self, device_name: str, lock_type: LockType | str) -> bool:
        """True if a ``lock_type`` request for the device would be granted now: it is free, or
        every lock in the way (active, preempted, or on a component) has lower priority."""
        wanted = LockType(_type_value(lock_type)).priority
        status = await self.get_lock_status(device_name)
        in_way = [*([status.lock] if status.lock else []), *status.preempted,
                  *status.component_locks]
        return all(wanted < lock.priority for lock in in_way)

    # -- monitoring ----------------------------------------------------------------------
    def add_lock_update_callback(self, callback: LockCallback) -> None:
        """Call ``callback(device_name, lock, action)`` (sync or async) for every change while
        monitoring. Exceptions it raises are logged and do not stop monitoring."""
        if callback not in self._monitor.lock_callbacks:
            self._monitor.lock_callbacks.append(callback)

    def remove_lock_update_callback(self, callback: LockCallback) -> None:
        if callback in self._monitor.lock_callbacks:
            self._monitor.lock_callbacks.remove(callback)

    def add_status_callback(self, callback: StatusCallback) -> None:
        """Call ``callback(locks)`` (sync or async) with every lock of each ``initial_status``:
        on the first connection and after every reconnect, so a consumer can resynchronise."""
        if callback not in self._monitor.status_callbacks:
            self._monitor.status_callbacks.append(callback)

    def remove_status_callback(self, callback: StatusCallback) -> None:
        if callback in self._monitor.status_callbacks:
            self._monitor.status_callbacks.remove(callback)

    def add_message_callback(self, callback: MessageCallback) -> None:
        """Call ``callback(message)`` (sync or async) with each ``initial_status`` and
        ``lock_update`` message as the service sent it (a dict), in order, after the cache
        applied it; events replayed after a reconnect are delivered once. For tools that show
        or record the service's own messages (``bs-coordination watch``)."""
        if callback not in self._monitor.message_callbacks:
            self._monitor.message_callbacks.append(callback)

    def remove_message_callback(self, callback: MessageCallback) -> None:
        if callback in self._monitor.message_callbacks:
            self._monitor.message_callbacks.remove(callback)

    async def start_websocket_monitoring(self, timeout: float | None = None) -> None:
        """Connect to ``ws_url`` and return once the initial status is in the cache (and the
        status callbacks have seen it). Reconnects by itself, resuming after the last event.

        Raises ``ServiceError`` if the socket cannot be opened or no initial status arrives
        within ``timeout`` (default: the client's timeout)."""
        await self._monitor.start(self.timeout if timeout is None else timeout)

    async def stop_websocket_monitoring(self) -> None:
        await self._monitor.stop()

    @property
    def monitoring(self) -> bool:
        """True while the monitoring task runs (also while it is reconnecting)."""
        return self._monitor.running

    @property
    def websocket_connected(self) -> bool:
        """The WebSocket is up and its initial status has arrived (a large table comes in
        pages: all of them): lock events are followed live from here."""
        return self._monitor.connected

    @property
    def last_event_id(self) -> str | None:
        """Id of the newest event delivered by monitoring (where a reconnect resumes)."""
        return self._monitor.last_event_id

    @property
    def reconnect_count(self) -> int:
        return self._monitor.reconnects

    def get_cached_lock_status(self, device_name: str) -> DeviceLock | None:
        """The active lock holding ``device_name`` (its own or an ancestor's) as last seen by
        monitoring, or ``None``."""
        return _cache.covering(self._monitor.cache, device_name)

    def get_all_cached_locks(self) -> dict[str, DeviceLock]:
        """Every active lock as last seen by monitoring, by device name (a copy)."""
        return dict(self._monitor.cache)

    # -- internals -----------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task the client keeps until it ends (``disconnect`` awaits it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
