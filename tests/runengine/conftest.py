"""Fixtures of the RunEngine tests: a real ``RunEngine``, ``ophyd.sim`` devices, the live
service, an HTTP "other party" (maintenance staff, an operator) and ``wait_until``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bluesky import RunEngine
from lockhttp import LockHttp
from ophyd import Component as Cpt
from ophyd import Device
from ophyd.sim import SynAxis, SynGauss

from bs_coordination.runengine.plugin import CoordinationHandle, install

USER = "queue_server"


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
               interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


class Service(LockHttp):
    """The lock service as another party sees it; ``held()`` defaults to the plans' user."""

    def held(self, user_id: str = USER) -> dict[str, dict[str, Any]]:
        return super().held(user_id)


class TcpProxy:
    """A loopback TCP forwarder to ``target_port``. ``cut()`` drops every connection and
    refuses new ones (as a network failure does) until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepting = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.accepting = False
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def restore(self) -> None:
        self.accepting = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(live_service: Any) -> Iterator[TcpProxy]:
    p = TcpProxy(live_service.port)
    yield p
    p.close()


class XY(Device):
    x = Cpt(SynAxis)
    y = Cpt(SynAxis)


class SampleStage(Device):
    coarse = Cpt(XY)


class Devices:
    """Fresh ophyd.sim devices for one test (positions start at 0)."""

    def __init__(self) -> None:
        self.motor = SynAxis(name="motor")
        self.motor1 = SynAxis(name="motor1")
        self.motor2 = SynAxis(name="motor2")
        self.slow_motor = SynAxis(name="slow_motor", delay=0.02)
        self.det = SynGauss("det", self.motor, "motor", center=0, Imax=1)
        self.det1 = SynGauss("det1", self.motor1, "motor1", center=0, Imax=1)
        self.det2 = SynGauss("det2", self.motor2, "motor2", center=0, Imax=1)
        self.stage = SampleStage(name="stage")


@pytest.fixture
def devices() -> Devices:
    return Devices()


@pytest.fixture
def service(live_service: Any) -> Iterator[Service]:
    s = Service(live_service.url)
    yield s
    s.close()


@pytest.fixture
def RE() -> RunEngine:
    # The RunEngine's loop thread is left running (idle): stopping it from here leaves its
    # coroutines to be collected later on the test thread, which upsets CPython 3.11.
    return RunEngine({})


@pytest.fixture
def coordinate(RE: RunEngine, live_service: Any) -> Iterator[Callable[..., CoordinationHandle]]:
    """``coordinate(**install_kwargs)`` installs the plugin on ``RE`` against the live service
    (short ``wait`` by default); it is uninstalled after the test."""
    handles: list[CoordinationHandle] = []

    def make(url: str | None = None, **kwargs: Any) -> CoordinationHandle:
        kwargs.setdefault("wait", 2.0)
        kwargs.setdefault("lease", 30.0)
        handle = install(RE, url or live_service.url, USER, **kwargs)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.uninstall()


class Recorder:
    """A RunEngine subscriber keeping documents. ``on_event(n, fn)`` runs ``fn`` at the n-th
    primary event, inline (the plan waits for it) or, with ``background=True``, in a thread
    of its own (to act on the RunEngine while it runs)."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self.primary: list[dict[str, Any]] = []
        self.interruptions: list[str] = []
        self._streams: dict[str, str] = {}
        self._hooks: dict[int, tuple[Callable[[], None], bool]] = {}
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def on_event(self, n: int, fn: Callable[[], None], background: bool = False) -> None:
        self._hooks[n] = (fn, background)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.append((name, doc))
        if name == "descriptor":
            self._streams[doc["uid"]] = doc.get("name", "primary")
        elif name == "event":
            stream = self._streams.get(doc["descriptor"])
            if stream == "interruptions":
                self.interruptions.append(str(doc["data"]["interruption"]))
            elif stream == "primary":
                self.primary.append(doc)
                hook = self._hooks.pop(len(self.primary), None)
                if hook is None:
                    return
                fn, background = hook
                if background:
                    t = threading.Thread(target=self._run, args=(fn,), daemon=True)
                    self.threads.append(t)
                    t.start()
                else:
                    self._run(fn)

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> None:
        for t in self.threads:
            t.join(30)
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
