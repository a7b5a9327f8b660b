"""The child-process side of device discovery: load a profile collection, describe its devices.

Run by the service by file path (so the child imports neither the service nor FastAPI), or
by hand as::

    python -m bs_coordination.service._discovery_worker --startup-dir DIR
    python -m bs_coordination.service._discovery_worker --startup-script FILE.py
    python -m bs_coordination.service._discovery_worker --startup-module NAME
    python -m bs_coordination.service._discovery_worker --yaml existing_plans_and_devices.yaml

It writes its result to its standard output and nothing else: whatever the startup code
prints goes to standard error (file descriptor 1 is pointed at 2 before anything runs), so a
chatty collection cannot corrupt the result. The result is JSON Lines: first
``{"ok": true, "qs_yaml": "...", "warnings": [...], "device_lines": N}`` then one line per root
device, or the single line ``{"ok": false, "error": "...", "traceback": "..."}``.

Startup code runs through bluesky-queueserver's own loader (``load_worker_startup_code``), in this
process only: a startup file that raises, hangs or crashes costs the service nothing but this
child, which the parent kills when its time limit runs out.

This module imports only the standard library at import time (ophyd, bluesky-queueserver and
PyYAML on use), and never anything from the service.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

#: Components deeper than this are not described (a guard against cyclic ophyd-async trees).
MAX_TREE_DEPTH = 20

#: Device types, as the original service named them.
MOTOR, DETECTOR, SIGNAL, FLYER, DEVICE = "motor", "detector", "signal", "flyer", "device"

_DETECTOR_BASES = {"ADBase", "DetectorBase", "StandardDetector", "SingleTriggerV33"}
_ASYNC_SIGNAL_BASES = {"Signal", "SignalR", "SignalW", "SignalRW", "SignalX"}
_DETECTOR_NAME_RE = re.compile(r"det|scaler|camera|gauss|counter", re.IGNORECASE)


# --------------------------------------------------------------------------- classification


def _mro_names(cls: type) -> set[str]:
    return {c.__name__ for c in getattr(cls, "__mro__", ())}


def _is_signal_class(cls: type) -> bool:
    for c in getattr(cls, "__mro__", ()):
        module = getattr(c, "__module__", "") or ""
        if c.__name__ == "Signal" and module.startswith("ophyd.signal"):
            return True
        if c.__name__ in _ASYNC_SIGNAL_BASES and module.startswith("ophyd_async"):
            return True
    return False


def _triggers_something(cls: type) -> bool:
    """True if the class does real work on ``trigger()``: it overrides the generic trigger of
    ophyd's ``Device``, or one of its components has a ``trigger_value``."""
    trigger = getattr(cls, "trigger", None)
    if trigger is None:
        return False
    owner = next((c for c in cls.__mro__ if "trigger" in vars(c)), None)
    # ophyd's own Device.trigger does work only through components with a trigger_value.
    if owner is not None and not (
        owner.__name__ in ("BlueskyInterface", "Device") and owner.__module__ == "ophyd.device"
    ):
        return True
    sig_attrs = getattr(cls, "_sig_attrs", None) or {}
    return any(getattr(cpt, "trigger_value", None) is not None for cpt in sig_attrs.values())


def classify(
    cls: type | None, classname: str, module: str, readable: bool, movable: bool, flyable: bool
) -> str:
    """The device type: ``signal``, ``flyer``, ``motor``, ``detector`` or ``device``.

    With the class at hand the decision follows its bases (ophyd ``Signal``, ophyd-async
    ``SignalR``..., area detectors, ``StandardDetector``, a real ``trigger()``); with only the names
    from an ``existing_plans_and_devices.yaml`` whose class cannot be imported (classes defined
    in the startup files themselves), it falls back to the class and module names.
    """
    if cls is not None and _is_signal_class(cls):
        return SIGNAL
    if cls is None and ("Signal" in classname or module.startswith("ophyd.signal")):
        return SIGNAL
    if movable:  # an ophyd-async Motor is flyable too, and still a motor
        return MOTOR
    if flyable:
        return FLYER
    if not readable:
        return DEVICE
    if cls is not None:
        if _mro_names(cls) & _DETECTOR_BASES or _triggers_something(cls):
            return DETECTOR
        return DEVICE
    if "areadetector" in module or _DETECTOR_NAME_RE.search(classname):
        return DETECTOR
    return DEVICE


# --------------------------------------------------------------------------- live objects


def _capabilities(obj: Any) -> dict[str, bool]:
    from bluesky import protocols

    return {
        "readable": isinstance(obj, protocols.Readable),
        "movable": isinstance(obj, protocols.Movable),
        "flyable": isinstance(obj, protocols.Flyable),
    }


def _pv_info(obj: Any) -> dict[str, str | None]:
    """EPICS names where ophyd knows them: a signal's read and write PVs, a device's prefix."""
    info: dict[str, str | None] = {"read_pv": None, "write_pv": None, "prefix": None}
    pvname = getattr(type(obj), "pvname", None)
    if isinstance(pvname, property):  # ophyd EpicsSignalBase
        info["read_pv"] = _str_or_none(getattr(obj, "pvname", None))
        # EpicsSignal writes to ``setpoint_pvname``; EpicsSignalRO has no write PV.
        info["write_pv"] = _str_or_none(getattr(obj, "setpoint_pvname", None))
    else:
        # ophyd-async EPICS signals: the backend knows both PVs; `source` is "ca://PV".
        backend = getattr(getattr(obj, "_connector", None), "backend", None)
        info["read_pv"] = _str_or_none(getattr(backend, "read_pv", None))
        info["write_pv"] = _str_or_none(getattr(backend, "write_pv", None))
        source = getattr(obj, "source", None)
        if info["read_pv"] is None and isinstance(source, str):
            proto, _, rest = source.partition("://")
            if rest and proto.split("+")[-1] in ("ca", "pva"):
                info["read_pv"] = rest
        # The backend names a write PV even for a read-only SignalR: the class decides.
        bases = _mro_names(type(obj))
        if "SignalR" in bases and not bases & {"SignalW", "SignalX"}:
            info["write_pv"] = None
        if bases & {"SignalW", "SignalX"} and "SignalR" not in bases:
            info["read_pv"] = None
    prefix = getattr(obj, "prefix", None)
    if isinstance(prefix, str) and prefix:
        info["prefix"] = prefix
    return info


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    """Components of an ophyd device (``component_names``) or an ophyd-async one (``children``)."""
    names = getattr(obj, "component_names", None)
    if isinstance(names, (tuple, list)):
        for attr in names:
            yield attr, getattr(obj, attr)
    elif callable(getattr(obj, "children", None)):
        yield from obj.children()


def _is_area_detector(obj: Any) -> bool:
    return "ADBase" in _mro_names(type(obj))


def describe_object(obj: Any, name: str, warnings: list[str], depth: int = 0) -> dict[str, Any]:
    """A JSON-ready description of ``obj`` and its components (dotted ``name`` from the root).

    Area detectors are not expanded (as the queue server does): their many lazy components are
    slow to build and would connect to PVs. ``components_complete`` says whether the listed
    components are all there are.
    """
    cls = type(obj)
    caps = _capabilities(obj)
    node: dict[str, Any] = {
        "name": name,
        "device_class": cls.__name__,
        "module": cls.__module__,
        "device_type": classify(cls, cls.__name__, cls.__module__, **caps),
        "capabilities": caps,
        "ophyd_name": _str_or_none(getattr(obj, "name", None)),
        **_pv_info(obj),
        "components": [],
        "components_complete": True,
    }
    if _is_area_detector(obj) or depth >= MAX_TREE_DEPTH:
        node["components_complete"] = not (
            getattr(obj, "component_names", None) or callable(getattr(obj, "children", None))
        )
        return node
    try:
        with _no_lazy_wait(obj):
            for attr, child in _children(obj):
                node["components"].append(
                    describe_object(child, f"{name}.{attr}", warnings, depth + 1)
                )
    except Exception as ex:  # a component that cannot be built (bad PV name, ...)
        warnings.append(f"device {name!r}: components not described: {ex}")
        node["components_complete"] = False
    return node


class _no_lazy_wait:
    """Build lazy ophyd components without waiting for their PVs to connect."""

    def __init__(self, obj: Any) -> None:
        self.cm = None
        try:
            from ophyd.device import Device, do_not_wait_for_lazy_connection

            if isinstance(obj, Device):
                self.cm = do_not_wait_for_lazy_connection(obj)
        except ImportError:  # pragma: no cover - ophyd is a dependency of bluesky-queueserver
            pass

    def __enter__(self) -> None:
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


class LoaderMissing(RuntimeError):
    """bluesky-queueserver (the 'discovery' extra) is not installed in the child's Python."""


def discover_live(args: argparse.Namespace) -> dict[str, Any]:
    """Run the startup code with the queue server's loader and describe every device."""
    try:
        from bluesky_queueserver.manager import profile_ops
    except ModuleNotFoundError as ex:
        raise LoaderMissing(
            f"running the startup code needs bluesky-queueserver's loader, which is not "
            f"installed ({ex}): install the service's 'discovery' extra, "
            f"pip install 'bs-coordination[discovery]', or give the collection an "
            f"existing_plans_and_devices.yaml and use --discovery yaml") from None
    import yaml

    nspace = profile_ops.load_worker_startup_code(
        startup_dir=args.startup_dir,
        startup_module_name=args.startup_module,
        startup_script_path=args.startup_script,
    )
    warnings: list[str] = []
    # Every device the queue server would see (registered ones included); the list is cut to
    # what it lists below. Described first: this walk builds lazy components without waiting
    # for their PVs, so the queue server's own walk then finds them built.
    candidates = dict(profile_ops.devices_from_nspace(nspace))
    for reg_name, reg in profile_ops.reg_ns_items.reg_devices.items():
        if reg.get("obj") is not None:
            candidates.setdefault(reg_name, reg["obj"])
    described: dict[str, dict[str, Any]] = {}
    for name in sorted(candidates):
        if "." in name:  # a registered component is described with its root
            continue
        try:
            described[name] = describe_object(candidates[name], name, warnings)
        except Exception as ex:
            warnings.append(f"device {name!r} could not be described: {ex}")
    qs_yaml: str | None = None
    try:
        # Exactly what `qserver-list-plans-devices` would write for this collection.
        plans, existing, _, _ = profile_ops.existing_plans_and_devices_from_nspace(
            nspace=nspace, ignore_invalid_plans=True
        )
        # The queue server dumps with PyYAML's default Dumper; libyaml's is the same format,
        # several times faster for a large collection.
        qs_yaml = "# This file is automatically generated. Edit at your own risk.\n" + yaml.dump(
            {"existing_plans": plans, "existing_devices": existing},
            Dumper=getattr(yaml, "CDumper", yaml.Dumper),
        )
        described = {n: d for n, d in described.items() if n in existing}  # exclusions
    except Exception as ex:
        warnings.append(f"queue-server description failed (no export): {ex}")
    devices = [described[n] for n in sorted(described)]
    return {"ok": True, "devices": devices, "qs_yaml": qs_yaml, "warnings": warnings}


# --------------------------------------------------------------------------- YAML fast path


def _import_class(module: str, classname: str, cache: dict[str, Any]) -> type | None:
    """The class named in the YAML file, if its module imports (never ``__main__``)."""
    if not module or module == "__main__":
        return None
    if module not in cache:
        try:
            cache[module] = importlib.import_module(module)
        except Exception:
            cache[module] = None
    cls = getattr(cache[module], classname, None) if cache[module] is not None else None
    return cls if isinstance(cls, type) else None


def describe_entry(
    name: str, entry: dict[str, Any], cache: dict[str, Any], depth: int = 0
) -> dict[str, Any]:
    """A description of one ``existing_devices`` entry of an ``existing_plans_and_devices.yaml``."""
    classname = str(entry.get("classname", ""))
    module = str(entry.get("module", ""))
    caps = {
        "readable": bool(entry.get("is_readable", False)),
        "movable": bool(entry.get("is_movable", False)),
        "flyable": bool(entry.get("is_flyable", False)),
    }
    cls = _import_class(module, classname, cache)
    comps = entry.get("components") or {}
    node: dict[str, Any] = {
        "name": name,
        "device_class": classname,
        "module": module,
        "device_type": classify(cls, classname, module, **caps),
        "capabilities": caps,
        "ophyd_name": None,
        "read_pv": None,
        "write_pv": None,
        "prefix": None,
        "components": [],
        # The file does not say whether a tree was cut short (area detectors, --device-max-depth).
        "components_complete": bool(comps) or (cls is not None and not _has_components(cls)),
    }
    if depth < MAX_TREE_DEPTH and isinstance(comps, dict):
        for attr in sorted(comps):
            if isinstance(comps[attr], dict):
                node["components"].append(
                    describe_entry(f"{name}.{attr}", comps[attr], cache, depth + 1)
                )
    return node


def _has_components(cls: type) -> bool:
    return bool(getattr(cls, "component_names", None)) or callable(getattr(cls, "children", None))


def discover_yaml(path: str) -> dict[str, Any]:
    """Describe the devices listed in an ``existing_plans_and_devices.yaml``."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    with open(path) as f:
        text = f.read()
    # The queue server's own loader (FullLoader), in its libyaml build when there is one.
    data = yaml.load(text, Loader=getattr(yaml, "CFullLoader", yaml.FullLoader))
    if not isinstance(data, dict) or not isinstance(data.get("existing_devices", {}), dict):
        raise ValueError(f"{path!r} is not an existing_plans_and_devices file (no mapping)")
    existing = data.get("existing_devices") or {}
    cache: dict[str, Any] = {}
    devices = [
        describe_entry(str(n), existing[n], cache)
        for n in sorted(existing)
        if isinstance(existing[n], dict)
    ]
    return {"ok": True, "devices": devices, "qs_yaml": text, "warnings": []}


# --------------------------------------------------------------------------- entry point


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--startup-dir")
    g.add_argument("--startup-script")
    g.add_argument("--startup-module")
    g.add_argument("--yaml")
    return p.parse_args(argv)


def _error_text(ex: BaseException) -> str:
    """``Error while executing script '...': ValueError: bad PV`` (the loader's message
    drops the type of the startup code's exception: put it back)."""
    cause = ex.__cause__
    text = str(ex)
    if isinstance(ex, LoaderMissing):
        return text
    if type(ex).__name__ == "ScriptLoadingError" and cause is not None:
        if str(cause) and text.endswith(str(cause)):
            return f"{text[: -len(str(cause))]}{type(cause).__name__}: {cause}"
        return f"{text} ({type(cause).__name__})"
    return f"{type(ex).__name__}: {text}"


def main(argv: list[str] | None = None) -> None:
    """Write one JSON result to the original standard output, then exit at once.

    ``os._exit`` skips interpreter shutdown: threads the startup code left running (a
    RunEngine's loop, channel-access contexts) must not keep the child alive after its answer.
    """
    _exit_with_parent()
    # Discovery is background work: on a busy machine the service's lock requests go first.
    with contextlib.suppress(OSError):
        os.nice(10)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # everything the startup code prints goes to stderr
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        args = _parse(argv)
        result = discover_yaml(args.yaml) if args.yaml else discover_live(args)
    except BaseException as ex:  # SystemExit and KeyboardInterrupt from startup code included
        tb = getattr(ex, "tb", None)  # ScriptLoadingError carries the startup traceback
        if not isinstance(tb, str):
            tb = "".join(traceback.format_exception(type(ex), ex, ex.__traceback__))
        result = {"ok": False, "error": _error_text(ex), "traceback": tb}
    try:
        # JSON Lines: the result without its devices, then one line per root device, so the
        # service parses a large result in small steps between lock requests.
        devices = result.pop("devices", [])
        result["device_lines"] = len(devices)
        lines = [json.dumps(result, default=str)]
        lines += [json.dumps(d, default=str) for d in devices]
        with os.fdopen(out_fd, "wb") as out:
            out.write("\n".join(lines).encode())
            out.flush()
        sys.stderr.flush()
    finally:  # a service that went away (broken pipe) must not leave this child behind
        os._exit(0)


def _exit_with_parent() -> None:
    """Exit if the service dies: the child runs in its own session, so nothing else would
    stop a hanging startup file once its parent is gone."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="discovery-parent-watch", daemon=True).start()


if __name__ == "__main__":
    main()
