"""Fixtures of the client tests: a connected client, a cuttable TCP proxy, ``eventually``.

The proxy is a real TCP forwarder on loopback in front of the service. Cutting it drops every
connection through it (as a network failure or a service restart does), ``pause`` makes it
refuse new ones, and ``retarget`` points it at another service, so reconnect behaviour is
tested against the real service without a fixed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bs_coordination import DeviceCoordinationClient

Eventually = Callable[..., Awaitable[Any]]


async def _eventually(predicate: Callable[[], Any], timeout: float = 5.0,
                      what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def eventually() -> Eventually:
    return _eventually


class TcpProxy:
    """Forwards loopback TCP connections to ``127.0.0.1:target_port``; keeps what clients
    sent upstream in ``sent`` (to check headers)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.paused = False
        self.accepted = 0
        self.refused = 0
        #: Seconds to hold each chunk a client sends before forwarding it (a slow network).
        self.delay = 0.0
        self.sent = bytearray()
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.paused:
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        tasks = [asyncio.create_task(self._pipe(reader, up_writer, record=True)),
                 asyncio.create_task(self._pipe(up_reader, writer, record=False))]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            self._conns.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    record: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                if record:
                    self.sent.extend(data)
                    if self.delay:
                        await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()

    def cut(self) -> None:
        """Drop every open connection (both sides see a reset)."""
        for client_w, up_w in list(self._conns):
            client_w.transport.abort()
            up_w.transport.abort()

    def pause(self) -> None:
        """Cut, and refuse new connections until ``resume``."""
        self.paused = True
        self.cut()

    def resume(self) -> None:
        self.paused = False

    def retarget(self, port: int) -> None:
        self.target_port = port

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[[int], Awaitable[TcpProxy]]]:
    """``await make_proxy(port)``: a started ``TcpProxy`` to that port, closed after the test."""
    proxies: list[TcpProxy] = []

    async def make(port: int) -> TcpProxy:
        p = TcpProxy(port)
        await p.start()
        proxies.append(p)
        return p

    try:
        yield make
    finally:
        for p in proxies:
            await p.close()


@pytest.fixture
async def proxy(live_service: Any, make_proxy: Callable[[int], Awaitable[TcpProxy]]
                ) -> TcpProxy:
    """A ``TcpProxy`` in front of ``live_service``."""
    return await make_proxy(live_service.port)


@pytest.fixture
async def client(live_service: Any) -> AsyncIterator[DeviceCoordinationClient]:
    """A client connected to ``live_service``; disconnected after the test."""
    c = DeviceCoordinationClient(live_service.url, timeout=10)
    await c.connect()
    try:
        yield c
    finally:
        await c.disconnect()


@pytest.fixture
async def other(live_service: Any) -> AsyncIterator[DeviceCoordinationClient]:
    """A second, independent client of ``live_service`` (another program)."""
    c = DeviceCoordinationClient(live_service.url, timeout=10)
    await c.connect()
    try:
        yield c
    finally:
        await c.disconnect()
