"""A lean HTTP/1.1 load generator for the throughput benchmarks.

Load generator and server share this 2-core machine. A general-purpose client (aiohttp) spends
about as much CPU on a request as a FastAPI server does, so with it the throughput figures
measure the client as much as the server: a lock+release pair is two requests, and with the
client the bottleneck, pairs/s can never pass half the anchor's requests/s whatever the server
does. This client does the least a keep-alive client can (one prebuilt request, the status
line and ``content-length`` parsed, nothing else), so the server is what runs out of CPU.
Every benchmark that compares against an anchor drives the anchor with the same client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any


class Connection:
    """One keep-alive connection; ``post`` sends a JSON body and returns status and body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s"
                          % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        i = head.lower().find(b"content-length:")
        length = int(head[i + 15:head.index(b"\r\n", i)])
        return status, await self.reader.readexactly(length)

    async def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        status, raw = await self.post(path, json.dumps(body).encode())
        return status, json.loads(raw)

    def close(self) -> None:
        self.writer.close()


async def drive(url: str, clients: int, seconds: float,
                work: Callable[[Connection, int], Awaitable[None]]) -> tuple[int, list[float]]:
    """``clients`` connections, each calling ``work(conn, i)`` in a loop for ``seconds``;
    returns how many calls finished and their latencies in seconds."""
    conns = [await Connection.open(url) for _ in range(clients)]
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def loop(conn: Connection, i: int) -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await work(conn, i)
            latencies.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(loop(c, i) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            c.close()
    return len(latencies), latencies


def run(coro: Awaitable[Any]) -> Any:
    """Run the load generator on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]
