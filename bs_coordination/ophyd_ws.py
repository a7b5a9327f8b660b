"""The Ophyd WebSocket server (PyPI ``ophyd-websocket``) with device coordination.

::

    pip install 'bs-coordination[ophyd-websocket]'      # Python >= 3.12 (ophyd-websocket needs it)
    python -m bs_coordination.ophyd_ws --coordination-url http://localhost:60620 \\
        --user-id ophyd_websocket --startup-dir /path/to/startup --port 8001

or, in Python::

    server = UnifiedOphydWebSocketServer(coordination_url="http://localhost:60620",
                                         user_id="ophyd_websocket")
    server.run(host="0.0.0.0", port=8001)

Every write through the server first holds a ``MANUAL_OPERATOR`` lock on the device:

- WebSocket ``set`` actions on ``/api/v1/device-socket`` and ``/api/v1/pv-socket``: the lock is
  taken at the first ``set`` of a device and held for the WebSocket session; it is released
  when the WebSocket closes. A refused ``set`` never reaches the device; the client gets
  ``{"error": "...", "holder": {...}}`` naming who holds it (type, reason, since, until).
- REST ``PUT /api/v1/devices`` and ``PUT /api/v1/pvs``: the lock is held for the request and
  released after it; a refusal is HTTP 409 with the same body.

A device or PV is locked by its registry name (a PV that belongs to a registered device locks
that device); equal or higher priority locks (another operator, the queue, maintenance) refuse
the write, and a lock of the session preempted by the queue refuses it too until it is restored.
The gate is a plain ASGI middleware (``CoordinationMiddleware``), so it also works around other
apps with the same routes.

Preemption handshake: the locks ask for it and the gate follows the service's event stream.
When a higher priority (maintenance) takes a device a session holds, the gate acknowledges
once the session's write to it in progress has ended: a WebSocket ``set`` is in progress from
its check until the server asks for the session's next message (the server handles one
message at a time), a REST ``PUT`` until its answer is sent. The preemptor is answered after
that; later sets are refused naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bs_coordination._cli._args import join_key_values
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import CoordinationError, LockNotFoundError
from bs_coordination.guard import describe
from bs_coordination.models import DeviceLock, LockType, PreemptionAck, check_device_name

log = logging.getLogger(__name__)

#: WebSocket paths (suffixes) whose ``set`` actions are gated, and the field naming the target.
WS_TARGETS = {"/device-socket": "device", "/pv-socket": "pv"}
#: REST paths (suffixes) whose ``PUT`` is gated, and the body field naming the target.
REST_TARGETS = {"/devices": "device", "/pvs": "pv"}
_INVALID = re.compile(r"[^A-Za-z0-9_:\-.]")


class AccessRefused(Exception):
    """A write was refused; ``holder`` is who is in the way, when known."""

    def __init__(self, message: str, holder: DeviceLock | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.holder = holder

    def body(self) -> dict[str, Any]:
        holder = self.holder.model_dump(mode="json") if self.holder else None
        return {"error": self.message, "holder": holder}


def lock_name(name: str) -> str:
    """The lock name of a registry device or PV name (characters a device name cannot have
    become ``_``, e.g. the braces of ``XF:31ID{Dev:1}Mtr``)."""
    cleaned = _INVALID.sub("_", name).strip(".") or "_"
    return check_device_name(cleaned[:200])


@dataclass
class _Held:
    lock_key: str
    user_id: str
    acquired_at: datetime
    expires_at: datetime | None

    def matches(self, lock: DeviceLock | None, name: str) -> bool:
        return (lock is not None and lock.device_name == name and lock.user_id == self.user_id
                and lock.acquired_at == self.acquired_at)


@dataclass(eq=False)
class Session:
    """The locks one WebSocket connection (or one REST request) holds, and its writes in
    progress (device name -> count)."""

    label: str
    held: dict[str, _Held] = field(default_factory=dict)
    writing: dict[str, int] = field(default_factory=dict)
    _idle: asyncio.Condition | None = field(default=None, repr=False)

    def _condition(self) -> asyncio.Condition:
        if self._idle is None:
            self._idle = asyncio.Condition()
        return self._idle

    def begin_write(self, name: str) -> None:
        self.writing[name] = self.writing.get(name, 0) + 1

    async def end_write(self, name: str) -> None:
        left = self.writing.get(name, 1) - 1
        if left:
            self.writing[name] = left
        else:
            self.writing.pop(name, None)
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def idle(self, name: str) -> None:
        """Return once no write of this session to ``name`` is in progress."""
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self.writing.get(name))


class CoordinationGate:
    """Takes, checks and releases ``MANUAL_OPERATOR`` locks for sessions (async)."""

    def __init__(self, client: DeviceCoordinationClient, user_id: str, *, lease: float | None = 300.0,
                 reason: str | None = "ophyd-websocket") -> None:
        self.client = client
        self.user_id = user_id
        self.lease = lease
        self.reason = reason
        self.sessions: set[Session] = set()
        self._monitoring: asyncio.Task[None] | None = None

    async def _follow_events(self) -> None:
        """Follow the event stream (once, before the first lock: no preemption is missed)."""
        task = self._monitoring
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            # (again after a failure: the service may be back)
            task = self._monitoring = asyncio.get_running_loop().create_task(
                self._start_monitoring())
        await asyncio.shield(task)

    async def _start_monitoring(self) -> None:
        self.client.add_lock_update_callback(self._on_update)  # (added once: a list without twins)
        await self.client.start_websocket_monitoring()

    def _on_update(self, device_name: str, lock: DeviceLock, action: str) -> None:
        if action != "preempted" or lock.preemption_ack is not PreemptionAck.PENDING:
            return
        name = lock.device_name
        for session in list(self.sessions):
            held = session.held.get(name)
            if held is not None and held.matches(lock, name):
                by = lock.preempted_by
                log.warning("%s: %s preempted by %s; acknowledging once its write in progress "
                            "ends", session.label, name, by.user_id if by else "a higher priority")
                asyncio.get_running_loop().create_task(
                    self._acknowledge(session, name, held.lock_key))

    async def _acknowledge(self, session: Session, name: str, lock_key: str) -> None:
        await session.idle(name)
        try:
            await self.client.acknowledge_preemption(lock_key, name)
        except LockNotFoundError:
            pass  # released meanwhile (the session ended): that answered the preemptor
        except CoordinationError as exc:
            log.warning("%s: could not acknowledge the preemption of %s: %s", session.label, name,
                        exc.message)

    async def ensure(self, name: str, session: Session) -> None:
        """Hold ``name`` for ``session`` now, or raise ``AccessRefused`` naming the holder."""
        await self._follow_events()
        status = await self.client.get_lock_status(name)
        mine = session.held.get(name)
        blockers = [lk for lk in [status.lock, *status.component_locks]
                    if lk is not None and lk.is_active and not (mine and mine.matches(lk, name))]
        if blockers:
            raise AccessRefused(f"set refused: {describe(blockers[0])}", blockers[0])
        if mine is not None and mine.matches(status.lock, name):
            await self._renew_if_due(mine)
            return
        session.held.pop(name, None)  # expired or force-released meanwhile
        response = await self.client.request_lock(name, LockType.MANUAL_OPERATOR, self.user_id,
                                                  timeout=self.lease, reason=self.reason,
                                                  acknowledge_preemption=True)
        if not response.success or not response.lock_key or not response.locks:
            holder = response.conflicts[0] if response.conflicts else None
            raise AccessRefused(f"set refused: {describe(holder) if holder else response.message}", holder)
        lock = response.locks[0]
        session.held[name] = _Held(response.lock_key, lock.user_id, lock.acquired_at, lock.expires_at)
        log.info("%s: holds %s (MANUAL_OPERATOR)", session.label, name)

    async def _renew_if_due(self, held: _Held) -> None:
        if held.expires_at is None or self.lease is None:
            return
        if (held.expires_at - datetime.now(timezone.utc)).total_seconds() < self.lease / 2:
            renewed = await self.client.renew_lock(held.lock_key, self.lease)
            held.expires_at = renewed.expires_at

    async def release(self, session: Session) -> None:
        """Give back every lock of ``session`` (on close); never raises."""
        for name, held in list(session.held.items()):
            try:
                await self.client.release_lock(name, held.lock_key, self.user_id)
            except LockNotFoundError:
                pass
            except CoordinationError as exc:  # its lease ends it anyway
                log.warning("%s: could not release %s: %s", session.label, name, exc.message)
            session.held.pop(name, None)
            log.info("%s: released %s", session.label, name)


def _suffix(path: str, table: dict[str, str]) -> str | None:
    for suffix, fld in table.items():
        if path.rstrip("/").endswith(suffix):
            return fld
    return None


class CoordinationMiddleware:
    """ASGI middleware gating writes of the ophyd-websocket routes; see the module docstring.

    ``resolve(name)`` maps a registry device or PV name to the name to lock (default:
    ``lock_name``)."""

    def __init__(self, app: Any, gate: CoordinationGate,
                 resolve: Callable[[str], str] = lock_name) -> None:
        self.app = app
        self.gate = gate
        self.resolve = resolve
        self._sessions = 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "websocket" and (fld := _suffix(scope.get("path", ""), WS_TARGETS)):
            await self._websocket(scope, receive, send, fld)
        elif (scope["type"] == "http" and scope.get("method") == "PUT"
              and (fld := _suffix(scope.get("path", ""), REST_TARGETS))):
            await self._rest(scope, receive, send, fld)
        else:
            await self.app(scope, receive, send)

    async def _websocket(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any],
                         fld: str) -> None:
        self._sessions += 1
        session = Session(f"websocket {self._sessions} {scope.get('path')}")
        self.gate.sessions.add(session)
        current: list[str] = []  # the set in progress: until the app asks for the next message

        async def gated_receive() -> dict[str, Any]:
            while current:
                await session.end_write(current.pop())
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    return message
                target = _set_target(message.get("text"), fld)
                if target is None:
                    return message
                name: str | None = None
                try:
                    name = self.resolve(target)
                    session.begin_write(name)  # from before its check: see the module doc
                    await self.gate.ensure(name, session)
                    current.append(name)
                    name = None  # in progress until the next receive
                    return message
                except (AccessRefused, ValueError) as exc:
                    body = exc.body() if isinstance(exc, AccessRefused) else {"error": f"set refused: {exc}"}
                    await send({"type": "websocket.send", "text": json.dumps(body)})
                except CoordinationError as exc:  # fail closed: no lock service, no write
                    await send({"type": "websocket.send", "text": json.dumps(
                        {"error": f"set refused: the coordination service cannot be asked: {exc.message}"})})
                finally:
                    if name is not None:  # refused (or cancelled): it never went ahead
                        await session.end_write(name)

        try:
            await self.app(scope, gated_receive, send)
        finally:
            while current:
                await session.end_write(current.pop())
            self.gate.sessions.discard(session)
            await self.gate.release(session)

    async def _rest(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any],
                    fld: str) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            target = json.loads(body).get(fld) if body else None
        except (ValueError, AttributeError):
            target = None
        session = Session(f"PUT {scope.get('path')}")
        name: str | None = None
        if isinstance(target, str) and target:
            self.gate.sessions.add(session)
            try:
                name = self.resolve(target)
                session.begin_write(name)  # in progress until the answer is sent
                await self.gate.ensure(name, session)
            except (AccessRefused, ValueError, CoordinationError) as exc:
                if name is not None:
                    await session.end_write(name)
                self.gate.sessions.discard(session)
                if isinstance(exc, AccessRefused):
                    await _json_response(send, 409, exc.body())
                elif isinstance(exc, ValueError):
                    await _json_response(send, 422, {"error": f"set refused: {exc}"})
                else:
                    await _json_response(send, 503, {"error": f"set refused: the coordination "
                                                              f"service cannot be asked: {exc.message}"})
                return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if name is not None:
                await session.end_write(name)
            self.gate.sessions.discard(session)
            await self.gate.release(session)


def _set_target(text: str | None, fld: str) -> str | None:
    """The device/PV a WebSocket ``set`` message names, or None for any other message."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("action") != "set":
        return None
    target = data.get(fld)
    return target if isinstance(target, str) and target else None


async def _json_response(send: Callable[..., Any], status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def registry_resolver() -> Callable[[str], str]:
    """Lock a PV by the registered device that owns it, else by its own (cleaned) name."""

    def resolve(name: str) -> str:
        from ophyd_websocket.device_registry import device_registry

        if device_registry.get_device(name) is None:
            for dev_name in device_registry.list_devices():
                device = device_registry.get_device(dev_name)
                walk = getattr(device, "walk_signals", None)
                signals = [s.item for s in walk()] if callable(walk) else [device]
                for sig in signals:
                    if name in (getattr(sig, "pvname", None), getattr(sig, "setpoint_pvname", None)):
                        return lock_name(dev_name)
        return lock_name(name)

    return resolve


class UnifiedOphydWebSocketServer:
    """The ophyd-websocket server app with every write gated by the coordination service
    (the name and arguments of the original design)."""

    def __init__(self, coordination_url: str = "http://localhost:60620", user_id: str = "ophyd_websocket", *,
                 api_key: str | None = None, lease: float | None = 300.0,
                 reason: str | None = "ophyd-websocket", startup_dir: str | None = None) -> None:
        try:
            from ophyd_websocket import server as ows
        except ImportError as exc:
            raise ImportError(
                "the Ophyd WebSocket integration needs the ophyd-websocket package (Python >= 3.12): "
                "pip install 'bs-coordination[ophyd-websocket]'") from exc
        if startup_dir is not None:
            os.environ["OAS_STARTUP_DIR"] = startup_dir  # the server's lifespan reads it
        self.coordination_url = coordination_url
        self.user_id = user_id
        self.client = DeviceCoordinationClient(coordination_url, api_key=api_key)
        self.gate = CoordinationGate(self.client, user_id, lease=lease, reason=reason)
        self.app = ows.app
        self.app.add_middleware(CoordinationMiddleware, gate=self.gate, resolve=registry_resolver())

    def run(self, host: str = "0.0.0.0", port: int = 8001, log_level: str = "info") -> None:
        """Serve until interrupted (blocking)."""
        import uvicorn

        uvicorn.run(self.app, host=host, port=port, log_level=log_level)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bs_coordination.ophyd_ws``: run the gated server."""
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m bs_coordination.ophyd_ws",
                                     description="Ophyd WebSocket server whose writes take MANUAL_OPERATOR locks.")
    parser.add_argument("--coordination-url", default=env.get("COORDINATION_URL", "http://localhost:60620"),
                        help="lock service URL [COORDINATION_URL]")
    parser.add_argument("--api-key", default=env.get("COORDINATION_API_KEY"), help="[COORDINATION_API_KEY]")
    parser.add_argument("--user-id", default="ophyd_websocket", help="holder named on its locks")
    parser.add_argument("--lease", type=float, default=300.0, help="lease of its locks, seconds")
    parser.add_argument("--startup-dir", default=env.get("OAS_STARTUP_DIR"),
                        help="ophyd startup files whose devices are served [OAS_STARTUP_DIR]")
    parser.add_argument("--host", default=env.get("OAS_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env.get("OAS_PORT", "8001")))
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(join_key_values(sys.argv[1:] if argv is None else argv, ("--api-key",)))
    server = UnifiedOphydWebSocketServer(args.coordination_url, args.user_id, api_key=args.api_key,
                                         lease=args.lease, startup_dir=args.startup_dir)
    server.run(host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()

__all__ = ["AccessRefused", "CoordinationGate", "CoordinationMiddleware", "UnifiedOphydWebSocketServer",
           "lock_name"]
