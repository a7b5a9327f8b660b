"""The child-process side of preflight: load a profile collection once, then dry-run plans.

Started by ``bs_coordination.service.preflight`` by file path (as the discovery worker is), it
loads the collection's startup code with bluesky-queueserver's own loader, answers one line on
its standard output, then serves dry runs, one JSON line in and one JSON line out::

    -> {"ready": true, "plans": 12, "load_s": 2.1}                      (or ready false + error)
    <- {"item": {"name": "scan", "args": [["det1"], "motor1", -1, 1, 5], "kwargs": {}},
        "time_limit": 10.0}
    -> {"ok": true, "devices": [{"device_name": "motor1", "source": "argument",
        "commands": ["read", "set"]}, ...], "complete": true, "reason": null, ...}
    -> {"ok": false, "error": "unknown_plan" | "bad_arguments", "message": "..."}

Before a dry run starts, the argument devices come on a line of their own
(``{"stage": "arguments", "devices": [...]}``), so the parent has them even if it must kill
this process.

A dry run: the plan function from the startup namespace, its arguments resolved by the queue
server's own ``prepare_plan`` (device names to devices, exactly as the RE Worker does), the
RunEngine's preprocessors of the startup code applied as ``RE(plan)`` would apply them (but not
this package's coordination preprocessor), and the messages driven by bluesky's
``RunEngineSimulator``: nothing is sent to a device. A reading has no value in a dry run
(bluesky's "list-ify" convention: ``None``; ``bps.rd`` gives its default), so a plan that
branches on readings is reported incomplete.

A dry run that runs past its time limit is interrupted here (``SIGALRM``), so this process stays
warm; if that does not work (a plan blocked in C code), the parent kills this process and
starts another. Everything the startup code or a plan prints goes to standard error.

Like the discovery worker, this module is the one place of the service package that imports
bluesky: it runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from typing import Any

log = logging.getLogger(__name__)

#: The user group the dry run validates items against: every plan and device of the collection.
GROUP = "preflight"
#: Messages that carry further devices in ``args`` (DESIGN.md, RunEngine facts).
_ARGS_DEVICE_COMMANDS = ("collect", "locate")
#: Commands that read a value the plan may use.
_READ_COMMANDS = ("read", "locate")
#: Exceptions that mean "the plan used a reading it did not get" when they follow a read.
_USES_READING = (TypeError, KeyError, IndexError, AttributeError, ValueError, ArithmeticError)
#: At most this many messages per dry run (a plan that never ends is cut, not run out of memory).
MAX_MESSAGES = 2_000_000
#: Address space of this process: a plan that allocates without bound (``scan(..., 10**9)``
#: builds its positions first) gets MemoryError instead of taking the machine's memory.
MEMORY_LIMIT_BYTES = 8 << 30

#: Why a dry run is incomplete (the ``incomplete`` field of an answer).
NEEDS_READINGS, TIME_LIMIT, EXCEPTION = "needs_readings", "time_limit", "exception"


class DryRunTimeLimit(BaseException):
    """Raised in the dry run by SIGALRM (a BaseException: a plan's ``except Exception`` must not
    swallow it)."""


class _TooLong(BaseException):
    """The plan yielded more than ``MAX_MESSAGES`` messages."""


class Collection:
    """The loaded startup namespace and what the queue server knows of it."""

    def __init__(self, args: argparse.Namespace) -> None:
        try:
            from bluesky_queueserver.manager import profile_ops
        except ModuleNotFoundError as ex:
            raise RuntimeError(
                f"a dry run needs bluesky-queueserver's loader, which is not installed ({ex}): "
                f"pip install 'bs-coordination[discovery]'") from None

        _note_value_reads()  # before the startup code imports bluesky.plan_stubs.rd
        _no_stack_capture()
        self.profile_ops = profile_ops
        self.nspace = profile_ops.load_worker_startup_code(
            startup_dir=args.startup_dir,
            startup_module_name=args.startup_module,
            startup_script_path=args.startup_script,
        )
        plans, devices, self.plans_in_nspace, self.devices_in_nspace = (
            profile_ops.existing_plans_and_devices_from_nspace(
                nspace=self.nspace, ignore_invalid_plans=True))
        self.allowed_plans = {GROUP: plans}
        self.allowed_devices = {GROUP: devices}

    def preprocessors(self) -> list[Callable[[Any], Any]]:
        """The startup RunEngine's preprocessors (``SupplementalData`` baselines...), without
        this package's own: the dry run must not take locks."""
        re = self.nspace.get("RE")
        found = list(getattr(re, "preprocessors", None) or [])
        return [p for p in found if not _module_of(p).startswith("bs_coordination")]

    def prepare(self, item: dict[str, Any]) -> dict[str, Any]:
        """The queue server's own resolution of ``item`` (plan function, device objects);
        raises ``_Refused`` naming what is wrong."""
        name = item.get("name")
        if not isinstance(name, str) or name not in self.allowed_plans[GROUP]:
            known = sorted(self.allowed_plans[GROUP])
            close = _close(str(name), known)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise _Refused("unknown_plan", f"plan {name!r} is not a plan of the profile "
                                           f"collection{hint}")
        plan = {"name": name, "args": list(item.get("args") or []),
                "kwargs": dict(item.get("kwargs") or {}), "user_group": GROUP}
        try:
            return dict(self.profile_ops.prepare_plan(
                plan, plans_in_nspace=self.plans_in_nspace,
                devices_in_nspace=self.devices_in_nspace, allowed_plans=self.allowed_plans,
                allowed_devices=self.allowed_devices, nspace=self.nspace))
        except Exception as ex:
            text = " ".join(str(ex).split("\nPlan:")[0].split())
            raise _Refused("bad_arguments", f"plan {name!r}: the arguments do not bind: "
                                            f"{text or type(ex).__name__}") from None


class _Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _module_of(obj: Any) -> str:
    return str(getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "") or "")


def _close(name: str, known: list[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, known, n=3, cutoff=0.6)


def _no_stack_capture() -> None:
    """bluesky's ``@plan`` objects format the whole call stack when created, to warn about a
    plan that was never iterated: 90% of a dry run's time (a 1,000-point grid scan creates
    12,000 of them). This process only dry-runs plans, so it does without the warning."""
    from bluesky import utils

    def init(self: Any, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._iter = f(*args, **kwargs)
        self._stack = None

    utils.Plan.__init__ = init  # type: ignore[method-assign]


# --------------------------------------------------------------------------- value reads

#: Devices whose value the plan asked for with ``bps.rd``/``bps.locate`` in the running dry run.
_value_reads: list[str] = []


def _note_value_reads() -> None:
    """Make ``bps.rd`` and ``bps.locate`` note what they read: in a dry run they give a default
    (0, None), so a plan that decides on their result may take another branch than for real."""
    import bluesky.plan_stubs as bps

    for name in ("rd", "locate"):
        original = getattr(bps, name, None)
        if original is None or getattr(original, "_preflight_noted", False):
            continue

        def noted(*objs: Any, _original: Any = original, **kwargs: Any) -> Any:
            _value_reads.extend(_label(o) for o in objs)
            return (yield from _original(*objs, **kwargs))

        noted._preflight_noted = True  # type: ignore[attr-defined]
        noted.__name__ = noted.__qualname__ = name
        noted.__doc__ = original.__doc__
        setattr(bps, name, noted)


def _label(obj: Any) -> str:
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) and name else repr(obj)


# --------------------------------------------------------------------------- the dry run


class _Devices:
    """Root devices touched, with the commands sent to each, in first-touched order."""

    def __init__(self) -> None:
        from bs_coordination.runengine.plans import lock_name

        self._lock_name = lock_name
        self._names: dict[int, tuple[Any, str | None]] = {}  # id -> (object kept alive, name)
        self.commands: dict[str, set[str]] = {}
        self.reads: list[str] = []
        self.messages = 0

    def name_of(self, obj: Any) -> str | None:
        hit = self._names.get(id(obj))
        if hit is None:
            name = self._lock_name(obj) if _is_device(obj) else None
            hit = self._names[id(obj)] = (obj, name)
        return hit[1]

    def note(self, msg: Any) -> None:
        self.messages += 1
        objs = [msg.obj]
        if msg.command in _ARGS_DEVICE_COMMANDS:
            objs.extend(msg.args)
        for obj in objs:
            if obj is None or isinstance(obj, (str, bytes, int, float, bool)):
                continue
            name = self.name_of(obj)
            if name is None:
                continue
            self.commands.setdefault(name, set()).add(msg.command)
            if msg.command in _READ_COMMANDS:
                self.reads.append(name)


def _is_device(obj: Any) -> bool:
    from bs_coordination.runengine.plans import is_device

    return bool(is_device(obj))


def _argument_devices(value: Any, devices: _Devices, found: dict[str, None]) -> None:
    """Root names of the device objects in resolved plan arguments (in lists, dicts...)."""
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return
    if isinstance(value, dict):
        for v in value.values():
            _argument_devices(v, devices, found)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _argument_devices(v, devices, found)
        return
    name = devices.name_of(value)
    if name is not None:
        found[name] = None


def _recorded(plan: Generator[Any, Any, Any], devices: _Devices) -> Generator[Any, Any, Any]:
    """``plan``, noting the devices of every message it yields."""
    reply: Any = None
    while True:
        try:
            msg = plan.send(reply)
        except StopIteration as stop:
            return stop.value
        if devices.messages >= MAX_MESSAGES:
            raise _TooLong()
        devices.note(msg)
        reply = yield msg


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise DryRunTimeLimit()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def dry_run(collection: Collection, item: dict[str, Any], time_limit: float,
            report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Dry-run one queue item; the answer document (see the module docstring). ``report``
    gets the argument devices before the plan runs (the parent keeps them if this process
    has to be killed)."""
    from bluesky.simulators import RunEngineSimulator
    from bluesky.utils import ensure_generator

    started = time.perf_counter()
    prepared = collection.prepare(item)
    devices = _Devices()
    arguments: dict[str, None] = {}
    _argument_devices([prepared["args"], prepared["kwargs"]], devices, arguments)
    if report is not None:
        report({"stage": "arguments", "devices": [
            {"device_name": n, "source": "argument", "commands": []} for n in arguments]})
    complete, incomplete, reason = True, None, None
    _value_reads.clear()
    try:
        with _time_limit(time_limit):
            plan = ensure_generator(prepared["callable"](*prepared["args"], **prepared["kwargs"]))
            for pp in collection.preprocessors():
                plan = pp(plan)
            RunEngineSimulator().simulate_plan(_recorded(plan, devices))
    except DryRunTimeLimit:
        complete, incomplete = False, TIME_LIMIT
        reason = (f"time-out: the dry run did not finish within its time limit of "
                  f"{time_limit:g} s (the plan hangs, waits for something, or is too long); "
                  f"it was stopped")
    except _TooLong:
        complete, incomplete = False, TIME_LIMIT
        reason = (f"time-out: the dry run was stopped after {MAX_MESSAGES} messages (the plan "
                  f"does not end)")
    except Exception as ex:
        complete = False
        what = f"{type(ex).__name__}: {ex}".strip()
        if devices.reads and isinstance(ex, _USES_READING):
            incomplete = NEEDS_READINGS
            read = sorted(set(devices.reads))
            reason = (f"adaptive plan: it needs real readings (it read {', '.join(read)}, "
                      f"{'which has' if len(read) == 1 else 'which have'} no value in a dry "
                      f"run, and then raised {what})")
        else:
            incomplete = EXCEPTION
            reason = f"exception: the plan raised {what} in its dry run"
    if complete and _value_reads:
        complete, incomplete = False, NEEDS_READINGS
        values = ", ".join(sorted(set(_value_reads)))
        reason = (f"adaptive plan: it decides on readings of {values} (bps.rd/bps.locate), which "
                  f"have no real value in a dry run, so it may touch other devices when it runs")
    found = [{"device_name": n, "source": "argument",
              "commands": sorted(devices.commands.get(n, ()))} for n in arguments]
    found += [{"device_name": n, "source": "dry_run", "commands": sorted(c)}
              for n, c in devices.commands.items() if n not in arguments]
    return {"ok": True, "devices": found, "complete": complete, "incomplete": incomplete,
            "reason": reason, "messages": devices.messages,
            "duration_s": round(time.perf_counter() - started, 6)}


# --------------------------------------------------------------------------- entry point


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--startup-dir")
    g.add_argument("--startup-script")
    g.add_argument("--startup-module")
    return p.parse_args(argv)


def _answer(out: Any, doc: dict[str, Any]) -> None:
    out.write(json.dumps(doc, default=str).encode() + b"\n")
    out.flush()


def serve(collection: Collection, requests: Any, out: Any) -> None:
    """Answer dry-run requests until standard input closes."""
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            item = request["item"]
            if not isinstance(item, dict):
                raise TypeError("item is not an object")
            answer = dry_run(collection, item, float(request.get("time_limit", 10.0)),
                             lambda doc: _answer(out, doc))
        except _Refused as ex:
            answer = {"ok": False, "error": ex.kind, "message": ex.message}
        except DryRunTimeLimit:  # arrived just after the plan ended: nothing to report but it
            answer = {"ok": False, "error": "internal", "message": "dry run interrupted"}
        except Exception as ex:
            answer = {"ok": False, "error": "internal", "message": f"{type(ex).__name__}: {ex}",
                      "traceback": traceback.format_exc()}
        _answer(out, answer)


def main(argv: list[str] | None = None) -> None:
    """Load the collection, say whether it loaded, serve dry runs; exit when stdin closes."""
    _exit_with_parent()
    _limit_memory()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the startup code or a plan prints goes to stderr
    sys.stdout = sys.stderr
    # Requests come on a private copy of stdin: a plan that reads stdin (input()) gets
    # end-of-file, never the next request.
    requests = os.fdopen(os.dup(0), "rb")
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)
    os.close(nothing)
    os.environ.setdefault("COORDINATION_DISABLED", "1")  # the example's switch: take no locks
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = time.perf_counter()
    try:
        collection = Collection(_parse(argv))
    except BaseException as ex:  # SystemExit and KeyboardInterrupt from startup code included
        cause = ex.__cause__
        text = f"{type(ex).__name__}: {ex}"
        if cause is not None:
            text += f" ({type(cause).__name__}: {cause})"
        tb = getattr(ex, "tb", None)
        _answer(out, {"ready": False, "error": text,
                      "traceback": tb if isinstance(tb, str) else traceback.format_exc()})
        os._exit(0)
    _answer(out, {"ready": True, "plans": len(collection.allowed_plans[GROUP]),
                  "load_s": round(time.perf_counter() - started, 3)})
    try:
        serve(collection, requests, out)
    finally:
        os._exit(0)  # threads the startup code started must not keep this process alive


def _limit_memory() -> None:
    """At most ``MEMORY_LIMIT_BYTES`` or half the machine's memory, whichever is less."""
    try:
        import resource

        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = max(2 << 30, min(MEMORY_LIMIT_BYTES, physical // 2))
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError) as ex:  # not on this platform: no limit
        log.warning("no memory limit for dry runs: %s", ex)


def _exit_with_parent() -> None:
    """Exit if the service dies (the child leads its own session)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="preflight-parent-watch", daemon=True).start()


if __name__ == "__main__":
    main()
