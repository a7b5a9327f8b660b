"""The plan side of coordination: every device a plan touches is held with a
``QUEUE_EXECUTING`` lock before a message touches it.

::

    from bs_coordination.plans import coordinated_decorator, coordinated_wrapper

    RE(coordinated_wrapper(scan([det], motor, -1, 1, 10), handle))   # handle = install(RE, ...)

    @coordinated_decorator(handle)
    def my_plan(dets, motor):
        ...

Plans need not be wrapped by hand: ``install()`` coordinates every plan the RunEngine runs
(see ``plugin.py``). Two mechanisms, one contract:

- ``coordinated_wrapper`` (explicit use, and ``CoordinatedPreprocessor`` without ``install``)
  wraps the plan generator and checks each message before passing it on.
- ``install(RE)`` wraps no generator: its preprocessor hands the RunEngine the plan itself
  behind one lock message (``plugin._LockedStart``), and the per-message check runs in the
  RunEngine's command dispatch. Why: bluesky 1.15's plan stubs format the whole call stack
  each time they are called (``bluesky.utils.Plan``), so every generator frame between the
  RunEngine and the plan makes every stub call dearer (about 4 % of a ``scan``).

Common to both:

- Devices known up front (the bound arguments of the plan generator, recursively inside
  lists, tuples, dicts and wrapped plans, e.g. ``SupplementalData`` baseline devices) are
  requested in **one** atomic request before the plan's first step: all or none, so two
  plans never deadlock over each other's devices. Any other device is locked the first time
  a message touches it (``obj``, and ``args`` of ``collect``/``locate``), by the root
  device's name (``bluesky.utils.root_ancestor``: ``stage`` for ``stage.coarse.x``).
- The lock I/O is awaited inside the RunEngine loop (the ``coordination_lock`` command,
  ``lock_command``, or the guarded device commands), so the plan generator never blocks. A
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

import inspect
import logging
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from bluesky.preprocessors import SupplementalData
from bluesky.utils import Msg, PlanHalt, ensure_generator, make_decorator, root_ancestor

from bs_coordination._re_client import queue_item_name
from bs_coordination._re_coordinator import PlanCoordinator
from bs_coordination._re_tracker import PlanLocks
from bs_coordination.errors import CoordinationError, InvalidRequestError
from bs_coordination.models import check_device_name

log = logging.getLogger(__name__)

#: The RunEngine command that takes locks (registered by ``install``).
LOCK_COMMAND = "coordination_lock"
#: Commands that carry further devices in ``msg.args``.
_ARGS_COMMANDS = frozenset({"collect", "locate"})
#: Bound on the objects looked at when collecting a plan's arguments.
_MAX_SCAN = 10_000


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
    return any(callable(getattr(obj, attr, None))
               for attr in ("read", "set", "trigger", "kickoff", "stage", "describe"))


def device_name(obj: Any) -> str:
    """The lock name of ``obj``: the name of its root device (``stage`` for ``stage.coarse.x``)."""
    root = root_ancestor(obj)
    name = getattr(root, "name", None)
    try:
        return check_device_name(name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidRequestError(
            f"cannot lock {obj!r}: its device has no usable name ({exc})") from None


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
        names: dict[str, None] = {}
        for obj in up_front:
            names[device_name(obj)] = None
        yield from _lock(coord, session, tuple(names))
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
    """Devices of ``msg`` not held yet; covers objects whose device is held and active.
    Raises at once for a device already refused to this plan."""
    needed: dict[str, None] = {}
    for obj in _objects(msg):
        try:
            if obj in session.covered:
                continue
        except TypeError:
            continue
        if not is_device(obj):
            session.covered.add(obj)  # never a device: never look again
            continue
        name = device_name(obj)
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
        if is_device(obj):
            name = device_name(obj)
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


def start_coordinated(plan: Iterable[Msg], coordinator: PlanCoordinator
                      ) -> tuple[PlanLocks, Generator[Msg, Any, Any], Msg]:
    """For a plan the RunEngine is about to run (``install``'s preprocessor; the RunEngine
    is idle): a new session, the plan generator, and the lock message for the devices known
    up front (one atomic request, to be granted before the plan's first step)."""
    gen = ensure_generator(plan)
    names: dict[str, None] = {}
    for obj in plan_devices(gen):
        names[device_name(obj)] = None
    session = coordinator.open_session(reason=_reason(coordinator, gen, None), new=True)[0]
    return session, gen, Msg(LOCK_COMMAND, coordinator, session, tuple(names))


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
    "plan_devices",
    "start_coordinated",
]
