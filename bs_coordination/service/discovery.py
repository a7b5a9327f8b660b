"""Device discovery: which devices the beamline's profile collection defines.

The collection's startup code runs with bluesky-queueserver's own loader in a **child process**
(``_discovery_worker``) with a time limit, so a startup file that raises, hangs or crashes
costs the service nothing: the child is killed, the error is reported, the last good device
list stays. The result is an immutable ``DeviceCatalog``; ``DeviceRegistry`` swaps catalogs
atomically (one reference assignment) and answers name look-ups, suggestions and status.

Where the collection is (``DiscoveryConfig.path``, see ``resolve_source``): a collection
directory holding ``startup/`` (as the original service took it), the startup directory itself,
a startup script (``*.py``/``*.ipy``), an ``existing_plans_and_devices.yaml`` file, or an
importable startup module name.

How (``DiscoveryMode``), default ``auto``:

- ``auto``: read the collection's ``existing_plans_and_devices.yaml`` (written by
  ``qserver-list-plans-devices``, looked for in the startup directory, then the collection
  directory, or beside the script) when there is one, which is fast, executes no beamline code
  and gives the same device list the queue server itself validates plans against; otherwise
  run the startup code. The file has no PV names: use ``load`` to get them.
- ``yaml``: the file only (an error if it is missing).
- ``load``: always run the startup code (slower; the authoritative and richest answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bs_coordination.errors import DiscoveryError, UnknownDeviceError

log = logging.getLogger(__name__)

#: Name of the file ``qserver-list-plans-devices`` writes.
QS_FILE_NAME = "existing_plans_and_devices.yaml"
#: Default time limit of one discovery, in seconds (the child is killed after it).
DEFAULT_DISCOVERY_TIMEOUT = 60.0
#: How much of the child's standard error is kept for an error report.
STDERR_TAIL_BYTES = 8192
#: Largest result a child may send (1,000 devices with components are a few MB).
MAX_RESULT_BYTES = 512 * 1024 * 1024
#: How many close names an unknown-device answer offers.
MAX_SUGGESTIONS = 5

_MODULE_NAME_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: The child runs the worker file by path, so it imports neither this package nor FastAPI.
_WORKER_FILE = str(Path(__file__).with_name("_discovery_worker.py"))
_WORKER_BOOT = ("import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
                "runpy.run_path(path, run_name='__main__')")


class DiscoveryMode(str, Enum):
    """How the device list is obtained (see the module docstring)."""

    AUTO = "auto"
    YAML = "yaml"
    LOAD = "load"


class DiscoveryState(str, Enum):
    """``disabled``: no collection configured (any name is accepted); ``loading``: the first
    discovery runs; ``loaded``: a device list is served; ``failed``: no list could be loaded."""

    DISABLED = "disabled"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class DeviceType(str, Enum):
    """What kind of device it is, as the original service named the kinds."""

    MOTOR = "motor"
    DETECTOR = "detector"
    SIGNAL = "signal"
    FLYER = "flyer"
    DEVICE = "device"


# --------------------------------------------------------------------------- models


class _Public(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DeviceCapabilities(_Public):
    """Bluesky protocols the device implements."""

    readable: bool
    movable: bool
    flyable: bool


class DeviceInfo(_Public):
    """One device or component, as discovered from the profile collection."""

    name: str = Field(description="Dotted name from the root device (`stage.coarse.x`).")
    device_class: str
    module: str
    device_type: DeviceType
    capabilities: DeviceCapabilities
    ophyd_name: str | None = Field(
        default=None, description="The object's own `.name` (may differ from `name`).")
    prefix: str | None = Field(default=None, description="EPICS prefix of the device.")
    read_pv: str | None = Field(default=None, description="EPICS PV the signal reads.")
    write_pv: str | None = Field(default=None, description="EPICS PV the signal writes.")
    components: list[DeviceInfo] = Field(default_factory=list)
    components_complete: bool = Field(
        default=True,
        description="False when components were not expanded (area detectors, depth limits): "
        "names below this one are then accepted without being listed.")


class DeviceListResponse(_Public):
    """Discovered devices (root devices, each with its components)."""

    devices: list[DeviceInfo]
    total_count: int
    source: str | None = None
    loaded_at: datetime | None = None


class DiscoveryStatus(_Public):
    """Where the device list came from, and how the last attempt went."""

    configured: bool = Field(description="A profile collection is configured.")
    state: DiscoveryState
    ready: bool = Field(description="The first discovery has finished (or none is configured).")
    path: str | None = None
    mode: DiscoveryMode
    strict: bool = Field(description="Lock requests for unknown devices are refused (404).")
    source: str | None = Field(default=None, description="What the served list was read from.")
    count: int = Field(description="Root devices in the served list.")
    component_count: int = Field(description="Names in the served list, components included.")
    loaded_at: datetime | None = None
    duration_s: float | None = Field(default=None, description="How long the last load took.")
    last_attempt_at: datetime | None = None
    last_error: str | None = Field(
        default=None, description="Why the last attempt failed (null after a success).")
    last_error_detail: str | None = Field(
        default=None, description="Traceback or output tail of the failed attempt.")
    warnings: list[str] = Field(default_factory=list)
    timeout_s: float


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DiscoveryConfig:
    """What to discover and how. ``path=None`` turns discovery off (any name is accepted)."""

    path: str | None = None
    mode: DiscoveryMode = DiscoveryMode.AUTO
    timeout: float = DEFAULT_DISCOVERY_TIMEOUT
    strict: bool = False
    python: str = field(default_factory=lambda: sys.executable)

    @classmethod
    def from_settings(cls, settings: Any) -> DiscoveryConfig:
        """From the service ``Settings`` (fields it lacks keep their defaults)."""
        return cls(
            path=getattr(settings, "profile_collection", None),
            mode=DiscoveryMode(getattr(settings, "discovery", DiscoveryMode.AUTO)),
            timeout=float(getattr(settings, "discovery_timeout", DEFAULT_DISCOVERY_TIMEOUT)),
            strict=bool(getattr(settings, "strict_devices", False)),
        )


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


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class DeviceCatalog:
    """One discovered device list, never changed after it is built (swapped whole)."""

    devices: list[DeviceInfo]
    source: str
    loaded_at: datetime
    duration_s: float
    qs_yaml: str | None
    warnings: list[str]
    index: dict[str, DeviceInfo]
    aliases: dict[str, str]
    #: Serialized answers, built once per catalog (a list of 1,000 devices is megabytes).
    rendered: dict[Any, bytes] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, result: dict[str, Any], source: str, duration_s: float,
              devices: list[DeviceInfo] | None = None) -> DeviceCatalog:
        """From a worker result (``devices`` given parsed, or as dicts in the result)."""
        if devices is None:
            devices = [DeviceInfo.model_validate(d) for d in result.get("devices", [])]
        index: dict[str, DeviceInfo] = {}

        def walk(node: DeviceInfo) -> None:
            index[node.name] = node
            for c in node.components:
                walk(c)

        for d in devices:
            walk(d)
        # A root's own ophyd name (`EpicsMotor(..., name="sample_x")` bound to `m1`) is what the
        # RunEngine plugin locks (the root's `.name`), so it is a known name too.
        aliases = {d.ophyd_name: d.name for d in devices
                   if d.ophyd_name and d.ophyd_name != d.name and d.ophyd_name not in index}
        return cls(devices=devices, source=source, loaded_at=datetime.now(timezone.utc),
                   duration_s=duration_s, qs_yaml=result.get("qs_yaml"),
                   warnings=[str(w) for w in result.get("warnings", [])], index=index,
                   aliases=aliases)

    def lookup(self, name: str) -> DeviceInfo | None:
        """The device or component of that dotted name (root ophyd names included)."""
        node = self.index.get(name)
        if node is not None:
            return node
        root, dot, rest = name.partition(".")
        if root in self.aliases:
            return self.index.get(self.aliases[root] + dot + rest)
        return None

    def knows(self, name: str) -> bool:
        """True if ``name`` is listed, or lies below a node whose components were not
        expanded (an area detector's ``det1.cam``)."""
        if self.lookup(name) is not None:
            return True
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            node = self.lookup(".".join(parts[:i]))
            if node is not None:
                return not node.components_complete
        return False

    def suggestions(self, name: str) -> list[str]:
        """Close known names: among the components of the deepest known ancestor, else among
        the root devices."""
        parts = name.split(".")
        candidates: list[str] = []
        for i in range(len(parts) - 1, 0, -1):
            node = self.lookup(".".join(parts[:i]))
            if node is not None:
                prefix = ".".join(parts[:i])
                candidates = [prefix + "." + c.name.rsplit(".", 1)[-1] for c in node.components]
                break
        else:
            candidates = [d.name for d in self.devices] + list(self.aliases)
        return difflib.get_close_matches(name, candidates, n=MAX_SUGGESTIONS, cutoff=0.6)

    @property
    def component_count(self) -> int:
        return len(self.index)


# --------------------------------------------------------------------------- the registry


class DeviceRegistry:
    """The devices the service knows, and the discovery that fills it.

    Plug into an app with ``registry.start()`` in the lifespan (discovery runs in the
    background; the service answers lock requests meanwhile) and ``await registry.close()``
    at shutdown.
    """

    def __init__(self, config: DiscoveryConfig | None = None) -> None:
        self.config = config or DiscoveryConfig()
        self._catalog: DeviceCatalog | None = None
        self._inflight: asyncio.Task[DeviceCatalog] | None = None
        self._finished_once = False
        self._last_error: str | None = None
        self._last_error_detail: str | None = None
        self._last_attempt_at: datetime | None = None
        self._last_duration: float | None = None
        self._background: asyncio.Task[None] | None = None

    # ---- life cycle

    @property
    def configured(self) -> bool:
        return bool(self.config.path)

    @property
    def ready(self) -> bool:
        """The first discovery has finished, success or failure (always, when none is set)."""
        return not self.configured or self._finished_once

    @property
    def catalog(self) -> DeviceCatalog | None:
        """The device list served now (``None`` before the first success)."""
        return self._catalog

    def start(self) -> None:
        """Start the first discovery in the background (no-op without a collection)."""
        if self.config.strict and not self.configured:
            log.warning("--strict-devices has no effect without --profile-collection: "
                        "every device name is accepted")
        if self.configured and self._background is None:
            self._background = asyncio.create_task(self._first(), name="device-discovery")

    async def _first(self) -> None:
        with contextlib.suppress(DiscoveryError):
            await self.reload()

    async def close(self) -> None:
        """Stop a running discovery (its child process is killed)."""
        for task in (self._background, self._inflight):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._background, self._inflight):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._background = self._inflight = None

    async def reload(self) -> DiscoveryStatus:
        """Discover again and swap the list in; on failure keep the last good list and raise
        ``DiscoveryError`` saying why. A reload asked for while one runs joins it."""
        if not self.configured:
            raise DiscoveryError(
                "no profile collection is configured (start the service with "
                "--profile-collection PATH)", status_code=409)
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._discover(), name="device-discovery-run")
            self._inflight.add_done_callback(_retrieve)
        # shield: a client that disconnects must not kill a discovery others wait for.
        await asyncio.shield(self._inflight)
        return self.status()

    async def _discover(self) -> DeviceCatalog:
        cfg = self.config
        assert cfg.path is not None
        started = time.monotonic()
        self._last_attempt_at = datetime.now(timezone.utc)
        try:
            source = resolve_source(cfg.path, cfg.mode)
            log.info("discovering devices from %s", source)
            result = await run_worker(source, cfg.timeout, cfg.python)
            devices = await parse_devices(result.pop("device_lines"))
            catalog = DeviceCatalog.build(result, str(source), time.monotonic() - started,
                                          devices)
        except (DiscoveryError, _Failure) as exc:
            self._fail(exc.message, getattr(exc, "detail", None), started)
            raise DiscoveryError(self._failure_message(), detail=self.status().model_dump(
                mode="json")) from None
        except Exception as exc:  # a malformed result: still a reported failure
            self._fail(f"{type(exc).__name__}: {exc}", None, started)
            raise DiscoveryError(self._failure_message()) from exc
        self._catalog = catalog  # the atomic swap
        self._last_error = self._last_error_detail = None
        self._last_duration = catalog.duration_s
        self._finished_once = True
        log.info("discovered %d devices (%d names) from %s in %.2f s", len(catalog.devices),
                 catalog.component_count, source, catalog.duration_s)
        for w in catalog.warnings[:20]:
            log.warning("discovery: %s", w)
        return catalog

    def _fail(self, message: str, detail: str | None, started: float) -> None:
        self._last_error = message
        self._last_error_detail = detail[-STDERR_TAIL_BYTES:] if detail else None
        self._last_duration = time.monotonic() - started
        self._finished_once = True
        log.error("device discovery failed: %s", message)

    def _failure_message(self) -> str:
        kept = self._catalog
        keep = (f"; kept the last good list ({len(kept.devices)} devices from {kept.source}, "
                f"loaded {kept.loaded_at.isoformat()})") if kept else "; no device list is loaded"
        return f"device discovery failed: {self._last_error}{keep}"

    # ---- queries

    def status(self) -> DiscoveryStatus:
        cat = self._catalog
        if not self.configured:
            state = DiscoveryState.DISABLED
        elif cat is not None:
            state = DiscoveryState.LOADED
        elif self._finished_once:
            state = DiscoveryState.FAILED
        else:
            state = DiscoveryState.LOADING
        return DiscoveryStatus(
            configured=self.configured, state=state, ready=self.ready, path=self.config.path,
            mode=self.config.mode, strict=self.config.strict,
            source=cat.source if cat else None,
            count=len(cat.devices) if cat else 0,
            component_count=cat.component_count if cat else 0,
            loaded_at=cat.loaded_at if cat else None, duration_s=self._last_duration,
            last_attempt_at=self._last_attempt_at, last_error=self._last_error,
            last_error_detail=self._last_error_detail,
            warnings=cat.warnings[:50] if cat else [], timeout_s=self.config.timeout)

    def list_devices(self, device_type: DeviceType | None = None) -> DeviceListResponse:
        cat = self._catalog
        devices = cat.devices if cat else []
        if device_type is not None:
            devices = [d for d in devices if d.device_type == device_type]
        return DeviceListResponse(devices=devices, total_count=len(devices),
                                  source=cat.source if cat else None,
                                  loaded_at=cat.loaded_at if cat else None)

    def list_devices_json(self, device_type: DeviceType | None = None) -> bytes:
        """``list_devices`` as JSON, rendered once per device list and type."""
        cat = self._catalog
        if cat is None:
            return self.list_devices(device_type).model_dump_json().encode()
        key = ("devices", device_type)
        if key not in cat.rendered:
            cat.rendered[key] = self.list_devices(device_type).model_dump_json().encode()
        return cat.rendered[key]

    def get_device(self, name: str) -> DeviceInfo:
        """The device or component ``name``; ``UnknownDeviceError`` (404) with close names."""
        cat = self._catalog
        if cat is None:
            why = (f"device discovery failed: {self._last_error}" if self._last_error
                   else "discovery is still running" if self.configured
                   else "no profile collection is configured")
            raise UnknownDeviceError(f"device {name!r}: no device list is loaded ({why})", name)
        node = cat.lookup(name)
        if node is None:
            raise UnknownDeviceError.for_name(name, cat.suggestions(name))
        return node

    def describe(self, name: str) -> dict[str, Any] | None:
        """Discovered info on ``name`` without its component tree, or ``None``."""
        cat = self._catalog
        node = cat.lookup(name) if cat else None
        if node is None:
            return None
        return node.model_dump(mode="json", exclude={"components"})

    def check_lock_names(self, names: list[str]) -> None:
        """With strict devices, refuse unknown names (``UnknownDeviceError``, 404, with close
        names) before anything changes.

        Strict checking fails closed: while no device list is loaded (the first discovery
        still runs, or every discovery so far failed) a strict service refuses every lock
        request with 503 naming the reason, and readiness is 503 too, until a discovery
        succeeds. Without a collection there is nothing to check against: every name is
        accepted (the service warns about that at start).
        """
        if not (self.config.strict and self.configured):
            return
        cat = self._catalog
        if cat is None:
            raise DiscoveryError(self.strict_unavailable_reason() or "no device list is loaded",
                                 status_code=503)
        unknown = [n for n in names if not cat.knows(n)]
        if unknown:
            if len(unknown) == 1:
                raise UnknownDeviceError.for_name(unknown[0], cat.suggestions(unknown[0]))
            raise UnknownDeviceError.for_names({n: cat.suggestions(n) for n in unknown})

    def strict_unavailable_reason(self) -> str | None:
        """Why a strict service cannot check device names now (``None`` when it can)."""
        if not (self.config.strict and self.configured) or self._catalog is not None:
            return None
        if not self._finished_once:
            return "strict device checking: the device list is still being loaded; retry shortly"
        return (f"strict device checking: no device list is loaded, so no lock is granted "
                f"(device discovery failed: {self._last_error}); fix the profile collection "
                f"and reload (POST /api/device-config/reload)")

    def queueserver_yaml(self) -> str:
        """The device list as ``existing_plans_and_devices.yaml`` text."""
        import yaml

        cat = self._catalog
        if cat is None:
            raise UnknownDeviceError(
                "no device list is loaded: nothing to export", "existing_plans_and_devices")
        if cat.qs_yaml:
            return cat.qs_yaml
        # Rebuilt from the tree (a result without the queue server's own description).
        return yaml.dump({"existing_plans": {},
                          "existing_devices": {d.name: _qs_entry(d) for d in cat.devices}})


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a discovery's failure as seen: it is reported through the status, and a waiter
    that went away must not leave "exception never retrieved" behind."""
    if not task.cancelled():
        task.exception()


def _qs_entry(node: DeviceInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "classname": node.device_class,
        "module": node.module,
        "is_readable": node.capabilities.readable,
        "is_movable": node.capabilities.movable,
        "is_flyable": node.capabilities.flyable,
    }
    if node.components:
        entry["components"] = {c.name.rsplit(".", 1)[-1]: _qs_entry(c) for c in node.components}
    return entry


__all__ = [
    "DEFAULT_DISCOVERY_TIMEOUT",
    "DeviceCapabilities",
    "DeviceCatalog",
    "DeviceInfo",
    "DeviceListResponse",
    "DeviceRegistry",
    "DeviceType",
    "DiscoveryConfig",
    "DiscoveryMode",
    "DiscoveryState",
    "DiscoveryStatus",
    "resolve_source",
    "run_worker",
]
