"""The warm dry-run child of preflight (see ``preflight``): started at the first dry run,
kept for the next ones, killed and started again when a plan cannot be stopped or ends it, or
when discovery loads a new device list. Dry runs go through it one at a time."""

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
from pathlib import Path
from typing import Any

from bs_coordination.errors import DiscoveryError, InvalidRequestError

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
        self._closed = False

    @property
    def configured(self) -> bool:
        return self.registry.configured

    async def close(self) -> None:
        """Stop the child (and a start in progress); no dry run is served afterwards."""
        self._closed = True
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
        if self._closed:
            raise PreflightUnavailable("the service is stopping")
        await self._discovery_settled()
        loaded_at = self._loaded_at()
        w = self._worker
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

    async def _discovery_settled(self) -> None:
        """Wait (up to the load time limit) for the first discovery to end, so that the child
        knows which device list it was started with: a later one restarts it."""
        deadline = time.monotonic() + self.load_timeout
        while not self.registry.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

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
        ``InvalidRequestError`` for an unknown plan or arguments that do not bind.

        The exchange with the child runs to its end even if the caller goes away (a client
        that disconnects): an answer left in the pipe would be read as the next item's."""
        task = asyncio.create_task(self._exchange(item), name="preflight-dry-run")
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _exchange(self, item: dict[str, Any]) -> dict[str, Any]:
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
            kind = "time_limit"
        else:
            reason = (f"exception: the dry run ended the dry-run process (exit code {code}); "
                      f"a new one is started")
            kind = "exception"
        log.warning("preflight: %s", reason)
        if self._closed:
            return {"ok": True, "devices": arguments, "complete": False, "incomplete": kind,
                    "reason": reason, "messages": 0}
        self._starting = asyncio.create_task(self._start(self._loaded_at()),
                                             name="preflight-worker-start")
        self._starting.add_done_callback(_retrieve)
        return {"ok": True, "devices": arguments, "complete": False, "incomplete": kind,
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


__all__ = ["DEFAULT_PREFLIGHT_TIMEOUT", "KILL_GRACE", "PreflightRunner", "PreflightUnavailable"]
