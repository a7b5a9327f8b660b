"""The plan side of coordination: every device a plan touches is held with a
``QUEUE_EXECUTING`` lock before a message touches it.

::

    from bs_coordination.runengine.plans import coordinated_decorator, coordinated_wrapper

    RE(coordinated_wrapper(scan([det], motor, -1, 1, 10), handle))   # handle = install(RE, ...)

    @coordinated_decorator(handle)
    def my_plan(dets, motor):
        ...

Plans need not be wrapped by hand: ``install()`` coordinates every plan the RunEngine runs
(see ``plugin.py``). Two mechanisms, one contract:

- ``coordinated_wrapper`` (explicit use, and ``CoordinatedPreprocessor`` without ``install``)
  wraps the plan generator and checks each message before passing it on.
- ``install(RE)`` wraps no generator and adds no message: its preprocessor hands the
  RunEngine the plan itself, the up-front request is awaited in the wrapped command of the
  plan's first message, and the per-message check runs in the RunEngine's command dispatch
  (see ``plugin.py``). Why: bluesky 1.15's plan stubs format the whole call stack
  each time they are called (``bluesky.utils.Plan``), so every generator frame between the
  RunEngine and the plan makes every stub call dearer (about 4 % of a ``scan``).

Common to both:

- Devices known up front (the bound arguments of the plan generator, recursively inside
  lists, tuples, dicts and wrapped plans, e.g. ``SupplementalData`` baseline devices) are
  requested in **one** atomic request before the plan's first message runs: all or none, so two
  plans never deadlock over each other's devices. Any other device is locked the first time
  a message touches it (``obj``, and ``args`` of ``collect``/``locate``), by the root
  device's name (``root_device``: ``stage`` for ``stage.coarse.x``), made acceptable to the
  service (``lock_name``: ``"sample x"`` is locked as ``"sample_x"``); unnamed devices are
  not coordinated (logged once per device).
- The lock I/O is awaited inside the RunEngine loop (``install``'s wrapped commands, or the
  ``coordination_lock`` command of ``coordinated_wrapper``), so the plan never blocks it. A
  refusal is raised there and thrown into the plan at the message that touched the device,
  so the plan's own cleanup runs.
- Once a device is locked, a message costs one set lookup (``obj in covered``).
- The locks are released when the plan ends, fails, is stopped or aborted. A **halt**
  deliberately keeps them: a halted RunEngine skipped its cleanup, so its devices stay
  reserved until the lease runs out (the heartbeat stops), as they do when the process is
  killed. ``coordinated_wrapper`` releases in a plain ``try/finally`` (``finalize_wrapper``
  would be skipped on a halt and on errors raised while mutating messages); ``install``
  releases when the RunEngine goes back to idle.

``coordinated_wrapper`` is a small hand-written generator rather than
``bluesky.preprocessors.plan_mutator``: ``plan_mutator`` keeps every message of the plan alive
until the plan ends (memory grows with plan length) and adds about half a microsecond per
message on its own.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from bluesky.preprocessors import SupplementalData
from bluesky.utils import Msg, PlanHalt, ensure_generator, make_decorator

from bs_coordination.errors import CoordinationError, InvalidRequestError
from bs_coordination.models import MAX_NAME_LENGTH, check_device_name
from bs_coordination.runengine._client_thread import queue_item_name
from bs_coordination.runengine._coordinator import PlanCoordinator
from bs_coordination.runengine._tracker import PlanLocks

log = logging.getLogger(__name__)

#: The RunEngine command that takes locks (registered by ``install``).
LOCK_COMMAND = "coordination_lock"
#: Commands that carry further devices in ``msg.args``.
_ARGS_COMMANDS = frozenset({"collect", "locate"})
#: Bound on the objects looked at when collecting a plan's arguments.
_MAX_SCAN = 10_000
#: Bound on the depth of a device tree (``parent`` links followed).
_MAX_DEPTH = 100
#: What a device can do (any one makes an object a device).
_DEVICE_METHODS = ("read", "set", "trigger", "kickoff", "stage", "describe", "locate",
                   "collect")
#: Characters a lock name may not hold (see ``models.DEVICE_NAME_RULE``).
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_:\-.]+")
#: ``id()`` of unnamed devices already logged (once per device).
_warned_unnamed: set[int] = set()


class _Granted:
    """The reply of ``lock_command``: the locks are held (a cancelled command replies None)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "GRANTED"


GRANTED = _Granted()


async def lock_command(msg: Msg) -> _Granted:
    """RunEngine command ``coordination_lock``: ``Msg(LOCK_COMMAND, coordinator, session,
    names)`` returns once ``names`` are held for ``session``, or raises (conflict, service
    unreachable). Register with ``RE.register_command(LOCK_COMMAND, lock_command)``."""
    coordinator, (session, names) = msg.obj, msg.args
    await coordinator.acquire(session, names)
    return GRANTED


# -- devices ---------------------------------------------------------------------------------

def is_device(obj: Any) -> bool:
    """True for ophyd and ophyd-async devices and signals (anything named that can be read,
    set, triggered, kicked off or staged)."""
    if obj is None or isinstance(obj, (str, bytes, int, float, complex, bool, Msg)):
        return False
    try:
        name = obj.name
    except Exception:
        return False
    if not isinstance(name, str):
        return False
    return _acts(obj)


def _acts(obj: Any) -> bool:
    """``obj`` can be read, set, triggered, kicked off, staged, located or collected."""
    for attr in _DEVICE_METHODS:
        try:
            if callable(getattr(obj, attr, None)):
                return True
        except Exception:  # a property that raises: not one of ours to judge
            continue
    return False


def _touches_device(obj: Any) -> bool:
    """For the object of a device message: a device, named or not (bluesky's protocols
    require no ``name`` of a movable, and ophyd-async devices are named ``""`` until named)."""
    if obj is None or isinstance(obj, (str, bytes, int, float, complex, bool, Msg)):
        return False
    return _acts(obj)


def root_device(obj: Any) -> Any:
    """The root of ``obj``'s device tree, following ``parent`` where there is one (bluesky's
    protocols make ``parent`` optional: an object without it is its own root)."""
    for _ in range(_MAX_DEPTH):
        try:
            parent = getattr(obj, "parent", None)
        except Exception:
            return obj
        if parent is None or parent is obj:
            return obj
        obj = parent
    return obj


def lock_name(obj: Any) -> str | None:
    """The name ``obj`` is locked under, or ``None`` for an unnamed device (not coordinated).

    The rule (README, "Device names"): the name of the root device (``stage`` for
    ``stage.coarse.x``, ``stage`` for the ophyd-async child ``stage-x``). A name the service
    accepts (``DEVICE_NAME_RULE``) is used as it is. Any other non-empty name is made
    acceptable: every run of other characters becomes ``_`` (``"sample x"`` ->
    ``"sample_x"``), so do dots that would not separate components, and a name longer than
    the service allows is cut and ends in a hash of the whole. Two devices mapped to one name
    share its lock (safe: more is locked, never less). A root device without a name (``""``,
    no ``name``: an ophyd-async device before it is named) has no identity anyone else
    could lock, so it is not coordinated; ``_needed`` logs that once per device.
    """
    root = root_device(obj)
    try:
        name = root.name
    except Exception:
        return None
    if not isinstance(name, str) or not name:
        return None
    try:
        return check_device_name(name)
    except ValueError:
        return _acceptable(name)


def _acceptable(name: str) -> str:
    text = _BAD_CHARS.sub("_", name)
    try:
        check_device_name(text[:MAX_NAME_LENGTH])
    except ValueError:  # empty components: '.a', 'a..b', 'a.'
        text = text.replace(".", "_")
    if len(text) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        text = f"{text[:MAX_NAME_LENGTH - 17]}-{digest}"
    return text


def device_name(obj: Any) -> str:
    """The lock name of ``obj`` (see ``lock_name``); raises ``InvalidRequestError`` for an
    unnamed device."""
    name = lock_name(obj)
    if name is None:
        raise InvalidRequestError(
            f"cannot lock {obj!r}: its device has no usable name (it is unnamed)")
    return name


def _warn_unnamed(obj: Any) -> None:
    """Once per device: it is used by a plan but not coordinated."""
    key = id(obj)
    if key in _warned_unnamed:
        return
    if len(_warned_unnamed) > 10_000:
        _warned_unnamed.clear()
    _warned_unnamed.add(key)
    log.warning("device coordination: %r (root %r) has no name, so it is not locked (nobody "
                "else could ask for it by name); name it to coordinate it", obj,
                root_device(obj))


def plan_devices(plan: Any) -> list[Any]:
    """Devices among the bound arguments of a not yet started plan generator.

    Looks recursively into lists, tuples, sets, dict values and wrapped plan generators (a
    preprocessor's generator holds the plan it wraps), so ``scan([det], motor, ...)`` gives
    ``[det, motor]`` and a ``SupplementalData``-wrapped plan adds its baseline, monitor and
    flyer devices.
    """
    found: dict[int, Any] = {}
    seen: set[int] = set()
    budget = [_MAX_SCAN]

    def visit(value: Any, depth: int) -> None:
        if budget[0] <= 0 or depth > 6 or id(value) in seen:
            return
        budget[0] -= 1
        seen.add(id(value))
        if inspect.isgenerator(value):
            frame = value.gi_frame
            if frame is not None and inspect.getgeneratorstate(value) == inspect.GEN_CREATED:
                for v in frame.f_locals.values():
                    visit(v, depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                visit(v, depth + 1)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif isinstance(value, SupplementalData):  # its wrappers are made when it runs
            for v in (value.baseline, value.monitors, value.flyers):
                visit(v, depth + 1)
        elif is_device(value):
            found.setdefault(id(value), value)

    visit(plan, 0)
    return list(found.values())


def plan_name(plan: Any) -> str | None:
    """The name of the innermost plan behind preprocessor wrappers (for the lock reason)."""
    name = None
    for _ in range(10):
        if not inspect.isgenerator(plan):
            break
        name = plan.__name__
        inner = None
        frame = plan.gi_frame
        if frame is not None and inspect.getgeneratorstate(plan) == inspect.GEN_CREATED:
            inner = next((v for v in frame.f_locals.values() if inspect.isgenerator(v)), None)
        if inner is None or not name.endswith("_wrapper"):
            break
        plan = inner
    return name


# -- the wrapper -------------------------------------------------------------------------------

def _reason(coord: PlanCoordinator, plan: Any, reason: str | None) -> str:
    if reason is not None:
        return reason
    name = queue_item_name() or plan_name(plan)
    return coord.reason or (f"RunEngine plan {name!r}" if name else "RunEngine plan")


def _lock(coordinator: PlanCoordinator, session: PlanLocks,
          names: tuple[str, ...]) -> Generator[Msg, Any, None]:
    while True:
        reply = yield Msg(LOCK_COMMAND, coordinator, session, names)
        if reply is GRANTED:
            return
        # None: a suspension cancelled the command (its request carries on); ask again.


def coordinated_wrapper(
    plan: Iterable[Msg],
    coordinator: Any,
    devices: Iterable[Any] | None = None,
    *,
    wait: float | None = None,
    plan_uid: str | None = None,
    reason: str | None = None,
) -> Generator[Msg, Any, Any]:
    """Run ``plan`` holding ``QUEUE_EXECUTING`` locks on every device it touches.

    ``coordinator``: the handle returned by ``install()`` or a started ``PlanCoordinator``
    (the RunEngine must know ``LOCK_COMMAND``: ``install()`` registers it, or call
    ``RE.register_command(LOCK_COMMAND, lock_command)``).
    ``devices``: the devices to lock up front in one request (default: those among the plan
    generator's bound arguments). ``wait``: seconds to wait for a taken device (default: the
    coordinator's). ``plan_uid``: default the queue item's uid under the queue server.
    Returns the plan's return value. Raises ``LockConflictError`` naming device, holder,
    lock type and reason when a device cannot be had within ``wait``.
    """
    coord: PlanCoordinator = getattr(coordinator, "coordinator", coordinator)
    up_front = list(devices) if devices is not None else plan_devices(plan)
    session, owner = coord.open_session(plan_uid=plan_uid, reason=_reason(coord, plan, reason),
                                        wait=wait)
    gen = ensure_generator(plan)
    release = True
    # The message loop is inlined here rather than delegated to a helper generator: bluesky's
    # plan stubs format the whole call stack each time they are called (``bluesky.utils.Plan``),
    # so every generator frame between the RunEngine and the plan costs time on every step.
    covered = session.covered
    reply: Any = None
    error: BaseException | None = None
    try:
        names = upfront_names(up_front)
        if names:
            yield from _lock(coord, session, names)
        while True:
            try:
                msg = gen.send(reply) if error is None else gen.throw(error)
            except StopIteration as stop:
                return stop.value
            error = None
            obj = msg.obj
            try:
                fast = obj is None or obj in covered
            except TypeError:  # unhashable: not a device
                fast = True
            if not fast or msg.command in _ARGS_COMMANDS:
                try:
                    needed = _needed(msg, session)
                    if needed:
                        yield from _lock(coord, session, needed)
                        _cover(msg, session)
                except GeneratorExit:
                    raise
                except BaseException as exc:  # refused: the plan sees it where it touched it
                    error, reply = exc, None
                    continue
            try:
                reply = yield msg
            except GeneratorExit:
                raise
            except BaseException as exc:
                error, reply = exc, None
    except PlanHalt:
        release = False  # a halt skips cleanup: the devices stay held until the lease ends
        raise
    finally:
        gen.close()
        if owner:
            coord.close_session(session, release=release)


def _objects(msg: Msg) -> list[Any]:
    objs = [msg.obj] if msg.obj is not None else []
    if msg.command in _ARGS_COMMANDS:
        objs.extend(msg.args)
    return objs


def _needed(msg: Msg, session: PlanLocks) -> tuple[str, ...]:
    """Devices of ``msg`` not held yet; covers objects whose device is held and active, and
    objects that need no lock (not a device, or an unnamed one). Raises at once for a device
    already refused to this plan."""
    needed: dict[str, None] = {}
    covered = session.covered
    for obj in _objects(msg):
        try:
            if obj in covered:
                continue
        except TypeError:
            continue
        name = lock_name(obj) if _touches_device(obj) else None
        if name is None:
            if _touches_device(obj):
                _warn_unnamed(obj)
            covered.add(obj)  # never locked: never look again in this plan
            continue
        refused = session.refused.get(name)
        if refused is not None:
            raise refused
        lock = session.held.get(name)
        if lock is not None and lock.is_active:
            session.cover(name, obj)
        else:
            needed[name] = None
    return tuple(needed)


def _cover(msg: Msg, session: PlanLocks) -> None:
    for obj in _objects(msg):
        name = lock_name(obj) if _touches_device(obj) else None
        if name is not None:
            lock = session.held.get(name)
            if lock is not None and lock.is_active:
                session.cover(name, obj)


async def lock_message_devices(coordinator: PlanCoordinator, session: PlanLocks,
                               msg: Msg) -> None:
    """On the RunEngine loop, before ``msg`` runs: hold the devices it touches for ``session``
    (the slow path of ``install``'s guarded commands, once per device and plan). Raises
    the refusal of a device (at once for one refused before); a suspension cancels the wait
    (the request carries on; the message runs again when the RunEngine replays it)."""
    needed = _needed(msg, session)
    if needed:
        await coordinator.acquire(session, needed)
        _cover(msg, session)


def upfront_names(devices: Iterable[Any]) -> tuple[str, ...]:
    """The lock names of ``devices`` (found up front), in order, without repeats; unnamed
    devices are left out (logged once each)."""
    names: dict[str, None] = {}
    for obj in devices:
        name = lock_name(obj)
        if name is None:
            _warn_unnamed(obj)
        else:
            names[name] = None
    return tuple(names)


coordinated_decorator = make_decorator(coordinated_wrapper)
coordinated_decorator.__doc__ = """Decorator form of ``coordinated_wrapper``::

    @coordinated_decorator(handle)
    def my_plan(dets, motor): ...
"""


class CoordinatedPreprocessor:
    """The entry ``install()`` appends to ``RE.preprocessors``.

    With ``start`` (what ``install`` passes: its RunEngine hooks check messages in the
    command dispatch and end the plan when the RunEngine goes idle) it hands every plan to
    ``start(plan)``, which returns it unwrapped behind one lock message. Without, it wraps
    every plan in ``coordinated_wrapper``.
    """

    _bs_coordination = True  # how a second install() finds the first one

    def __init__(self, coordinator: PlanCoordinator, RE: Any = None, *,
                 start: Callable[[Iterable[Msg]], Iterator[Msg]] | None = None) -> None:
        self.coordinator = coordinator
        self.RE = RE
        self.start = start
        self._warned = False

    def __call__(self, plan: Iterable[Msg]) -> Iterator[Msg]:
        if self.RE is not None and not self._warned and self.RE.preprocessors[-1] is not self:
            # The last preprocessor is the outermost: one added after us inserts messages
            # (e.g. SupplementalData's baseline readings) that we never see.
            self._warned = True
            log.warning("the device coordination preprocessor is not the last entry of "
                        "RE.preprocessors: devices used by later entries (%r) are not in the "
                        "plan's up-front request%s; call install() again after adding them",
                        self.RE.preprocessors[self.RE.preprocessors.index(self) + 1:],
                        " (they are locked when first touched)" if self.start else
                        " and not locked at all")
        if self.start is not None:
            return self.start(plan)
        return coordinated_wrapper(plan, self.coordinator)

    def __repr__(self) -> str:
        return f"CoordinatedPreprocessor({self.coordinator!r})"


__all__ = [
    "GRANTED",
    "LOCK_COMMAND",
    "CoordinatedPreprocessor",
    "CoordinationError",
    "PlanCoordinator",
    "coordinated_decorator",
    "coordinated_wrapper",
    "device_name",
    "is_device",
    "lock_command",
    "lock_message_devices",
    "lock_name",
    "plan_devices",
    "root_device",
    "upfront_names",
]
