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
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bs_coordination.errors import DiscoveryError, UnknownDeviceError

from .discovery_child import (
    DEFAULT_DISCOVERY_TIMEOUT,
    QS_FILE_NAME,
    STDERR_TAIL_BYTES,
    DiscoverySource,
    _Failure,
    parse_devices,
    resolve_source,
    run_worker,
)
from .discovery_models import (
    DeviceCapabilities,
    DeviceInfo,
    DeviceListResponse,
    DeviceType,
    DiscoveryMode,
    DiscoveryState,
    DiscoveryStatus,
)

log = logging.getLogger(__name__)

#: How many close names an unknown-device answer offers.
MAX_SUGGESTIONS = 5


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
    "QS_FILE_NAME",
    "DeviceCapabilities",
    "DeviceCatalog",
    "DeviceInfo",
    "DeviceListResponse",
    "DeviceRegistry",
    "DeviceType",
    "DiscoveryConfig",
    "DiscoveryMode",
    "DiscoverySource",
    "DiscoveryState",
    "DiscoveryStatus",
    "resolve_source",
    "run_worker",
]
