"""Fixtures for every test suite: a real lock service on a loopback port, the store matrix,
and a guard that fails a test which leaves asyncio tasks running.

- ``live_service``: the service on the memory store, as a ``LiveService`` (``.url``,
  ``.ws_url``, ``.app``, ``.settings``).
- ``service_factory(store_url="memory", **settings)``: start more services (another store,
  a second replica on the same Redis, different settings); all are stopped after the test.
- ``store_url``: ``"memory"`` and, when ``bs_coordination.stores.redis`` exists, the URL of a
  private redis-server; parametrize a whole suite over stores by requesting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from etcd_nodes import EtcdCluster, etcd_cluster

from bs_coordination.service import create_app
from bs_coordination.service.config import Settings
from bs_coordination.stores import Store

#: How long a service may take to start or stop.
SERVER_START_SECONDS = 15.0


def _redis_store_available() -> bool:
    try:
        importlib.import_module("bs_coordination.stores.redis")
    except ImportError:
        return False
    return True


STORE_PARAMS = (["memory", "redis"] if _redis_store_available() else ["memory"]) + ["etcd"]


class ThreadedServer(uvicorn.Server):
    """uvicorn in a background thread with its own event loop (as tiled's test server).

    uvicorn installs no signal handlers outside the main thread, so the test keeps Ctrl-C.
    """

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[ThreadedServer]:
        errors: list[BaseException] = []
        # What the service logs while it starts (uvicorn prints a failed lifespan's traceback
        # to its log, not to the exception it ends with), shown if it does not start.
        startup_log = _StartupLog()

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:  # reported to the test thread below
                errors.append(exc)

        thread = threading.Thread(target=target, name="bs-coordination-test-server", daemon=True)
        with startup_log.attached():
            thread.start()
            try:
                deadline = time.monotonic() + SERVER_START_SECONDS
                while not self.started:
                    if not thread.is_alive() or time.monotonic() > deadline:
                        detail = f": {errors[0]!r}" if errors else ""
                        raise RuntimeError(f"the test service did not start{detail}\n"
                                           f"--- the service's log while it started ---\n"
                                           f"{startup_log.text() or '(nothing logged)'}")
                    time.sleep(0.005)
            except BaseException:
                self.should_exit = True
                thread.join(SERVER_START_SECONDS)
                raise
        try:
            yield self
        finally:
            self.should_exit = True
            thread.join(SERVER_START_SECONDS)
            if thread.is_alive():
                self.force_exit = True
                thread.join(SERVER_START_SECONDS)

    @property
    def port(self) -> int:
        sock = self.servers[0].sockets[0]
        return int(sock.getsockname()[1])


class _StartupLog(logging.Handler):
    """Collects the service's and uvicorn's log records (warnings and worse, tracebacks
    included) while a test service starts."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        # uvicorn's own loggers do not propagate to the root logger.
        loggers = [logging.getLogger(), logging.getLogger("uvicorn"),
                   logging.getLogger("uvicorn.error")]
        for lg in loggers:
            lg.addHandler(self)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeHandler(self)


@dataclass
class LiveService:
    """A running service: ``url`` (``http://127.0.0.1:PORT``) and ``ws_url`` (``ws://.../ws``)."""

    url: str
    ws_url: str
    app: Any
    settings: Settings
    server: ThreadedServer

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.contextmanager
def run_service(store_url: str = "memory", *, store: Store | None = None,
                configure: Callable[[Any], None] | None = None,
                **settings: Any) -> Iterator[LiveService]:
    """Start a service on 127.0.0.1 and an ephemeral port; stop it on exit.

    ``store`` (a ``Store`` object, e.g. a ``MemoryStore`` with a small log) replaces the one
    ``store_url`` names; ``configure(app)`` runs before it starts (a deployer's middleware)."""
    cfg = Settings(host="127.0.0.1", port=0, store=store_url, log_level="WARNING", **settings)
    app = create_app(cfg, store=store)
    if configure is not None:
        configure(app)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2)
    server = ThreadedServer(config)
    with server.run_in_thread():
        port = server.port
        yield LiveService(url=f"http://127.0.0.1:{port}", ws_url=f"ws://127.0.0.1:{port}/ws",
                          app=app, settings=cfg, server=server)


ServiceFactory = Callable[..., LiveService]


@pytest.fixture
def service_factory() -> Iterator[ServiceFactory]:
    """``service_factory(store_url="memory", store=None, **settings) -> LiveService``; all stop
    after the test."""
    with contextlib.ExitStack() as stack:

        def start(store_url: str = "memory", **settings: Any) -> LiveService:
            return stack.enter_context(run_service(store_url, **settings))


        yield start


@pytest.fixture
def live_service(service_factory: ServiceFactory) -> LiveService:
    """The lock service on the memory store, fresh for each test."""
    return service_factory("memory")


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdCluster]:
    """One private single-node etcd for the session (``etcd_nodes``); tests keep apart by key
    prefix (``etcd_url``). Skipped without etcd, failed when CI requires it."""
    with etcd_cluster(1) as cluster:
        yield cluster


_etcd_prefixes = itertools.count()


@pytest.fixture
def etcd_url(etcd_server: EtcdCluster) -> str:
    """``etcd://127.0.0.1:PORT/<a key prefix of this test's own>?max_txn_ops=1024`` on the
    session's etcd."""
    return f"{etcd_server.url}/test{next(_etcd_prefixes)}-{time.time_ns()}{etcd_server.options}"


@pytest.fixture(params=STORE_PARAMS)
def store_url(request: pytest.FixtureRequest) -> str:
    """``"memory"``, then a private Redis URL (once the Redis store exists)."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return str(server.url)
    if request.param == "etcd":
        return str(request.getfixturevalue("etcd_url"))
    return "memory"


@pytest.fixture
def service(store_url: str, service_factory: ServiceFactory) -> LiveService:
    """The lock service on each store of ``store_url``."""
    return service_factory(store_url)


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running on its loop (they are cancelled)."""
    yield
    me = asyncio.current_task()
    for _ in range(3):  # let tasks that are finishing (cancelled, closing) finish
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not pending:
            return
        await asyncio.sleep(0.01)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    names = ", ".join(f"{t.get_name()} ({t.get_coro()!r})" for t in pending)
    pytest.fail(f"the test left {len(pending)} asyncio task(s) running: {names}")
