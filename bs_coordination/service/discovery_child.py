"""Running one discovery: where the collection's devices are read from (``resolve_source``)
and the child process that reads them (``run_worker``, the ``_discovery_worker`` script run by
path with a time limit, killed with its process group after it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bs_coordination.errors import DiscoveryError

from .discovery_models import DeviceInfo, DiscoveryMode

#: Name of the file ``qserver-list-plans-devices`` writes.
QS_FILE_NAME = "existing_plans_and_devices.yaml"
#: Default time limit of one discovery, in seconds (the child is killed after it).
DEFAULT_DISCOVERY_TIMEOUT = 60.0
#: How much of the child's standard error is kept for an error report.
STDERR_TAIL_BYTES = 8192
#: Largest result a child may send (1,000 devices with components are a few MB).
MAX_RESULT_BYTES = 512 * 1024 * 1024
_MODULE_NAME_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: The child runs the worker file by path, so it imports neither this package nor FastAPI.
_WORKER_FILE = str(Path(__file__).with_name("_discovery_worker.py"))
_WORKER_BOOT = ("import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
                "runpy.run_path(path, run_name='__main__')")


@dataclass(frozen=True)
class DiscoverySource:
    """One way of reading the collection: the worker's option (``startup-dir``,
    ``startup-script``, ``startup-module``, ``yaml``) and its argument."""

    kind: str
    target: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.target}"


def _qs_file_near(*dirs: Path) -> Path | None:
    for d in dirs:
        candidate = d / QS_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def resolve_source(path: str, mode: DiscoveryMode) -> DiscoverySource:
    """Decide how to read ``path`` (see the module docstring); ``DiscoveryError`` if it cannot
    be read at all. Called for every attempt, so a path that appears later is picked up."""
    p = Path(path).expanduser()
    startup: DiscoverySource | None = None
    qs_file: Path | None = None
    if p.is_dir():
        if (p / "startup").is_dir():
            startup_dir = p / "startup"
            startup = DiscoverySource("startup-dir", str(startup_dir.resolve()))
            qs_file = _qs_file_near(startup_dir, p)
        else:
            if any(p.glob("*.py")) or any(p.glob("*.ipy")):
                startup = DiscoverySource("startup-dir", str(p.resolve()))
            qs_file = _qs_file_near(p)
        if startup is None and qs_file is None:
            raise DiscoveryError(
                f"profile collection {path!r}: no startup files (*.py, *.ipy), no startup/ "
                f"directory and no {QS_FILE_NAME} in it")
    elif p.is_file():
        if p.suffix in (".yaml", ".yml"):
            qs_file = p
        else:
            startup = DiscoverySource("startup-script", str(p.resolve()))
            qs_file = _qs_file_near(p.parent)
    elif _MODULE_NAME_RE.match(path) and "/" not in path:
        startup = DiscoverySource("startup-module", path)
    else:
        raise DiscoveryError(f"profile collection {path!r} does not exist")

    if mode == DiscoveryMode.LOAD:
        if startup is None:
            raise DiscoveryError(
                f"profile collection {path!r}: discovery mode 'load' needs startup code, "
                f"found only {qs_file}")
        return startup
    if qs_file is not None:
        return DiscoverySource("yaml", str(qs_file.resolve()))
    if mode == DiscoveryMode.YAML:
        raise DiscoveryError(
            f"profile collection {path!r}: discovery mode 'yaml' needs {QS_FILE_NAME} "
            "(write it with qserver-list-plans-devices), and there is none")
    assert startup is not None
    return startup


# --------------------------------------------------------------------------- the child process


class _Failure(Exception):
    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the child and whatever it started (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _read_all(stream: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(1 << 16):
        size += len(chunk)
        if size > MAX_RESULT_BYTES:
            raise _Failure(f"discovery result larger than {MAX_RESULT_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_tail(stream: asyncio.StreamReader) -> bytes:
    tail: deque[bytes] = deque()
    size = 0
    while chunk := await stream.read(1 << 16):
        tail.append(chunk)
        size += len(chunk)
        while size - len(tail[0]) > STDERR_TAIL_BYTES:
            size -= len(tail.popleft())
    return b"".join(tail)[-STDERR_TAIL_BYTES:]


def _tail_text(raw: bytes) -> str:
    return raw.decode(errors="replace").strip()


async def run_worker(source: DiscoverySource, timeout: float, python: str) -> dict[str, Any]:
    """Run the discovery child on ``source``; return its result document.

    Raises ``_Failure`` with a message for a person (and the traceback or output tail) when the
    startup code fails, the child crashes, or it runs past ``timeout`` seconds (it is killed).
    """
    proc = await asyncio.create_subprocess_exec(
        python, "-c", _WORKER_BOOT, _WORKER_FILE, f"--{source.kind}", source.target,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: a timeout kills its children too
    )
    assert proc.stdout is not None and proc.stderr is not None
    out_task = asyncio.create_task(_read_all(proc.stdout), name="discovery-stdout")
    err_task = asyncio.create_task(_read_tail(proc.stderr), name="discovery-stderr")
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            _kill_group(proc)
            await proc.wait()
            err = await _finish(err_task)
            raise _Failure(
                f"{source}: discovery did not finish within the time limit of {timeout:g} s "
                "(the startup code hangs or is too slow); the loading process was killed",
                _tail_text(err) or None) from None
        # The child has answered. Whatever it started is a copy made for discovery only: it
        # goes too (and may be what still holds the pipes open).
        _kill_group(proc)
        try:
            out, err = await asyncio.wait_for(asyncio.gather(out_task, err_task), 5.0)
        except asyncio.TimeoutError:
            out, err = await _finish(out_task), await _finish(err_task)
    except BaseException:
        _kill_group(proc)
        for t in (out_task, err_task):
            t.cancel()
        await asyncio.gather(out_task, err_task, return_exceptions=True)
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()
        raise
    head, _, rest = out.partition(b"\n")
    try:
        result = json.loads(head) if head else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise _Failure(
            f"{source}: the discovery process exited with code {proc.returncode} without a "
            "result (the startup code may have ended the process)", _tail_text(err) or None)
    if not result.get("ok"):
        raise _Failure(f"{source}: {result.get('error', 'unknown error')}",
                       result.get("traceback") or _tail_text(err) or None)
    lines = rest.split(b"\n") if rest else []
    if len(lines) != result.get("device_lines", 0):
        raise _Failure(f"{source}: the discovery result is cut short "
                       f"({len(lines)} of {result.get('device_lines')} devices)")
    result["device_lines"] = lines
    return result


#: Devices parsed between two yields to the event loop (a few ms of work at most).
PARSE_BATCH = 20


async def parse_devices(lines: list[bytes]) -> list[DeviceInfo]:
    """Parse the child's device lines in small batches: a 1,000-device result takes a
    noticeable time to parse, and lock requests must not wait for all of it at once."""
    devices = []
    for i, line in enumerate(lines, 1):
        devices.append(DeviceInfo.model_validate_json(line))
        if i % PARSE_BATCH == 0:
            await asyncio.sleep(0)
    return devices


async def _finish(task: asyncio.Task[bytes]) -> bytes:
    """What a reader task got, once its pipe closed (or nothing, if it never does)."""
    try:
        return await asyncio.wait_for(task, 1.0)
    except (asyncio.TimeoutError, _Failure):
        return b""


__all__ = [
    "DEFAULT_DISCOVERY_TIMEOUT",
    "MAX_RESULT_BYTES",
    "QS_FILE_NAME",
    "STDERR_TAIL_BYTES",
    "DiscoverySource",
    "parse_devices",
    "resolve_source",
    "run_worker",
]
