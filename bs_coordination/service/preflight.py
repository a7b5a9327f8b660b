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

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bs_coordination.errors import DiscoveryError, InvalidRequestError
from bs_coordination.models import MAX_NAME_LENGTH, DeviceLock, LockType
from bs_coordination.stores import Store

from .discovery import DeviceRegistry, DiscoveryMode, resolve_source

log = logging.getLogger(__name__)

#: Default time limit of one dry run, in seconds.
DEFAULT_PREFLIGHT_TIMEOUT = 10.0
#: Seconds past the time limit before a child that did not answer is killed.
KILL_GRACE = 2.0
#: Longest answer line accepted from the child.
MAX_LINE_BYTES = 64 * 1024 * 1024
_WORKER_FILE = str(Path(__file__).with_name("_preflight_worker.py"))
_WORKER_BOOT = ("import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
                "runpy.run_path(path, run_name='__main__')")
_STDERR_TAIL = 8192


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


# --------------------------------------------------------------------------- the child


class PreflightUnavailable(DiscoveryError):
    """The collection cannot be loaded for a dry run (503)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=503)


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    err_tail: bytearray = field(default_factory=bytearray)
    err_task: asyncio.Task[None] | None = None
    catalog_at: datetime | None = None


class PreflightRunner:
    """The warm dry-run child of one service. ``await dry_run(item)``; ``await close()``."""

    def __init__(self, registry: DeviceRegistry, time_limit: float = DEFAULT_PREFLIGHT_TIMEOUT,
                 load_timeout: float = 60.0, python: str | None = None) -> None:
        self.registry = registry
        self.time_limit = float(time_limit)
        self.load_timeout = float(load_timeout)
        self.python = python or sys.executable
        self._worker: _Worker | None = None
        self._starting: asyncio.Task[_Worker] | None = None
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return self.registry.configured

    async def close(self) -> None:
        """Stop the child (and a start in progress)."""
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
            self._starting = None
        await self._stop()

    async def _stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        _kill_group(worker.proc)
        with contextlib.suppress(ProcessLookupError):
            await worker.proc.wait()
        if worker.err_task is not None:
            worker.err_task.cancel()
            with contextlib.suppress(BaseException):
                await worker.err_task

    async def _get(self) -> _Worker:
        """The running child; started (or restarted for a new device list) when needed."""
        loaded_at = self._loaded_at()
        w = self._worker
        if w is not None and w.catalog_at is None:
            w.catalog_at = loaded_at  # started before the first discovery ended: same code
        if w is not None and (w.proc.returncode is not None or w.catalog_at != loaded_at):
            await self._stop()
        if self._worker is None:
            if self._starting is None or self._starting.done():
                self._starting = asyncio.create_task(self._start(loaded_at),
                                                     name="preflight-worker-start")
            starting = self._starting
            try:
                self._worker = await asyncio.shield(starting)
            finally:
                if starting.done():
                    self._starting = None
        return self._worker

    def _loaded_at(self) -> datetime | None:
        """When discovery loaded the device list served now: a newer list restarts the child."""
        catalog = self.registry.catalog
        return catalog.loaded_at if catalog else None

    async def _start(self, loaded_at: datetime | None) -> _Worker:
        path = self.registry.config.path
        if not path:
            raise DiscoveryError("preflight needs a profile collection: start the service with "
                                 "--profile-collection PATH", status_code=409)
        try:
            source = resolve_source(path, DiscoveryMode.LOAD)
        except DiscoveryError as exc:
            raise PreflightUnavailable(f"preflight cannot load the collection: {exc.message}"
                                       ) from None
        env = dict(os.environ, COORDINATION_DISABLED="1")  # the dry run takes no locks
        proc = await asyncio.create_subprocess_exec(
            self.python, "-c", _WORKER_BOOT, _WORKER_FILE, f"--{source.kind}", source.target,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, env=env,
            limit=MAX_LINE_BYTES)
        worker = _Worker(proc, catalog_at=loaded_at)
        assert proc.stderr is not None
        worker.err_task = asyncio.create_task(_tail(proc.stderr, worker.err_tail),
                                              name="preflight-worker-stderr")
        started = time.monotonic()
        try:
            ready = await self._read(worker, self.load_timeout)
        except BaseException:
            self._worker = worker
            await self._stop()
            raise
        if ready is None or not ready.get("ready"):
            self._worker = worker
            await self._stop()
            why = (ready or {}).get("error") or (
                f"the process ended or did not answer within {self.load_timeout:g} s: "
                f"{bytes(worker.err_tail[-600:]).decode(errors='replace').strip()}")
            raise PreflightUnavailable(f"preflight could not load the profile collection "
                                       f"({source}): {why}")
        log.info("preflight: %s loaded in %.2f s (%s plans)", source,
                 time.monotonic() - started, ready.get("plans"))
        return worker

    async def _read(self, worker: _Worker, timeout: float) -> dict[str, Any] | None:
        """The child's next JSON line; ``None`` at end of output or when ``timeout`` runs out."""
        assert worker.proc.stdout is not None
        try:
            line = await asyncio.wait_for(worker.proc.stdout.readline(), timeout)
        except (asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
            return None
        if not line:
            return None
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def dry_run(self, item: dict[str, Any]) -> dict[str, Any]:
        """The child's answer for ``item`` (see ``_preflight_worker``). Raises
        ``InvalidRequestError`` for an unknown plan or arguments that do not bind."""
        async with self._lock:
            worker = await self._get()
            assert worker.proc.stdin is not None
            request = {"item": item, "time_limit": self.time_limit}
            try:
                worker.proc.stdin.write(json.dumps(request).encode() + b"\n")
                await worker.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                await self._stop()
                worker = await self._get()
                assert worker.proc.stdin is not None
                worker.proc.stdin.write(json.dumps(request).encode() + b"\n")
                await worker.proc.stdin.drain()
            deadline = time.monotonic() + self.time_limit + KILL_GRACE
            first = await self._read(worker, self.time_limit + KILL_GRACE)
            if first is not None and first.get("stage") == "arguments":
                answer = await self._read(worker, max(0.0, deadline - time.monotonic()))
                if answer is None:
                    return await self._lost(worker, first.get("devices") or [])
                return answer
            if first is None:
                return await self._lost(worker, [])
            if not first.get("ok"):
                kind, message = first.get("error"), str(first.get("message", "dry run failed"))
                if kind in ("unknown_plan", "bad_arguments"):
                    raise InvalidRequestError(message)
                raise PreflightUnavailable(f"preflight failed: {message}")
            return first

    async def _lost(self, worker: _Worker, arguments: list[dict[str, Any]]) -> dict[str, Any]:
        """The child hung past the grace or died during a dry run: kill it, start another."""
        assert worker.proc.stdout is not None
        if worker.proc.stdout.at_eof():  # it ended: learn how
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(worker.proc.wait(), 2.0)
        code = worker.proc.returncode
        await self._stop()
        if code is None:
            reason = (f"time-out: the dry run did not finish within its time limit of "
                      f"{self.time_limit:g} s and could not be interrupted; the dry-run "
                      f"process was killed")
            kind = Incomplete.TIME_LIMIT
        else:
            reason = (f"exception: the dry run ended the dry-run process (exit code {code}); "
                      f"a new one is started")
            kind = Incomplete.EXCEPTION
        log.warning("preflight: %s", reason)
        self._starting = asyncio.create_task(self._start(self._loaded_at()),
                                             name="preflight-worker-start")
        self._starting.add_done_callback(_retrieve)
        return {"ok": True, "devices": arguments, "complete": False, "incomplete": kind.value,
                "reason": reason, "messages": 0}


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _tail(stream: asyncio.StreamReader, tail: bytearray) -> None:
    while chunk := await stream.read(1 << 16):
        tail.extend(chunk)
        if len(tail) > _STDERR_TAIL:
            del tail[:-_STDERR_TAIL]


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


async def preflight(runner: PreflightRunner, store: Store, item: QueueItem) -> PreflightResponse:
    """Dry-run ``item`` and join its devices to the lock table."""
    started = time.perf_counter()
    if not runner.configured:
        raise DiscoveryError("preflight needs a profile collection: start the service with "
                             "--profile-collection PATH", status_code=409)
    if item.item_type != "plan":
        raise InvalidRequestError(f"item.item_type: only plans can be dry-run, got "
                                  f"{item.item_type!r}")
    answer = await runner.dry_run(item.model_dump(mode="json"))
    devices = [PredictedDevice.model_validate(d) for d in answer.get("devices") or []]
    conflicts = await conflicts_for(store, [d.device_name for d in devices])
    incomplete = answer.get("incomplete")
    return PreflightResponse(
        plan=item.name, devices=devices, complete=bool(answer.get("complete")),
        reason=answer.get("reason"), incomplete=Incomplete(incomplete) if incomplete else None,
        conflicts=conflicts, can_start=not conflicts, messages=int(answer.get("messages") or 0),
        duration_s=round(time.perf_counter() - started, 6))


__all__ = [
    "DEFAULT_PREFLIGHT_TIMEOUT",
    "DeviceSource",
    "Incomplete",
    "PredictedDevice",
    "PreflightConflict",
    "PreflightRequest",
    "PreflightResponse",
    "PreflightRunner",
    "QueueItem",
    "conflicts_for",
    "preflight",
]
