"""Service benchmarks on the memory store (issue 2).

1. lock+release pairs/s through the service, 50 concurrent clients, one uvicorn worker,
   against a trivial FastAPI JSON endpoint's requests/s measured the same way in the same run
   (target >= 0.5x). Both servers run under the same uvicorn settings (``_common.UVICORN``)
   and are driven by the same lean keep-alive client (``_load.py``: a general-purpose client
   costs as much CPU per request as the server, and would make the client the thing measured).
   Rounds alternate anchor and service; the figure is the median of the per-round ratios.
   Beside it, the server's own CPU time per request (anchor) and per pair (service), read from
   ``/proc``: the ratio of those is what the throughput ratio would be on an idle machine,
   and moves much less when other jobs share the cores;
2. lock operation latency with 10 and with 100,000 locks held, in the store and through HTTP
   (target: flat, ratio ~1);
3. one event delivered to 500 WebSocket subscribers: p99 from the request to each subscriber
   (target <= 100 ms), with and without a stalled subscriber that never reads.

Run: ``python benchmarks/bench_service.py`` (about a minute and a half; ``BENCH_SECONDS`` and
``BENCH_ROUNDS`` set the length of the throughput part).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    HEADER,
    cpu_seconds,
    percentile,
    row,
    service,
    service_under_uvicorn,
    statistics,
    trivial_process,
)
from _load import Connection, drive, run

from bs_coordination.models import LockRequest, LockType
from bs_coordination.stores import MemoryStore

CLIENTS = 50
SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ECHO_BODY = json.dumps({"device_name": "bench", "user_id": "c"}).encode()


async def lock_release_pairs(url: str) -> tuple[int, list[float]]:
    """Pairs done in ``SECONDS`` by ``CLIENTS`` connections, each on its own device."""
    async def pair(conn: Connection, i: int) -> None:
        body = {"device_name": f"bench{i}", "lock_type": "MANUAL_OPERATOR", "user_id": f"c{i}"}
        status, answer = await conn.post_json("/api/lock/request", body)
        assert status == 200, answer
        status, answer = await conn.post_json("/api/lock/release", {"lock_key": answer["lock_key"]})
        assert status == 200, answer

    return await drive(url, CLIENTS, SECONDS, pair)


async def trivial_requests(url: str) -> tuple[int, list[float]]:
    async def one(conn: Connection, i: int) -> None:
        status, _ = await conn.post("/echo", ECHO_BODY)
        assert status == 200

    return await drive(url, CLIENTS, SECONDS, one)


def measured(proc: subprocess.Popen[bytes], work: Any) -> tuple[float, float, list[float]]:
    """Rate (per second), server CPU seconds per unit, and latencies of ``work`` on ``proc``."""
    before = cpu_seconds(proc.pid)
    done, latencies = run(work(proc.url))  # type: ignore[attr-defined]
    return done / SECONDS, (cpu_seconds(proc.pid) - before) / done, latencies


def throughput() -> list[str]:
    """Alternating rounds of anchor and service; medians of the per-round figures."""
    rounds = []
    for k in range(ROUNDS):
        order = ["anchor", "service"] if k % 2 == 0 else ["service", "anchor"]
        got: dict[str, tuple[float, float, list[float]]] = {}
        for which in order:
            if which == "anchor":
                with trivial_process() as proc:
                    got[which] = measured(proc, trivial_requests)
            else:
                with service_under_uvicorn("memory") as proc:
                    got[which] = measured(proc, lock_release_pairs)
        rounds.append(got)
    rate = statistics.median(r["service"][0] for r in rounds)
    anchor = statistics.median(r["anchor"][0] for r in rounds)
    ratio = statistics.median(r["service"][0] / r["anchor"][0] for r in rounds)
    cpu = statistics.median(r["service"][1] for r in rounds)
    anchor_cpu = statistics.median(r["anchor"][1] for r in rounds)
    cpu_ratio = statistics.median(r["anchor"][1] / r["service"][1] for r in rounds)
    lat = [x for r in rounds for x in r["service"][2]]
    return [
        row(f"lock+release pairs/s, {CLIENTS} clients, memory store (median of {ROUNDS} rounds)",
            f"{rate:.0f}/s (p50 {percentile(lat, 50) * 1e3:.1f} ms, p99 {percentile(lat, 99) * 1e3:.1f} ms)",
            f"trivial FastAPI {anchor:.0f} req/s", ratio, ">= 0.5x"),
        row("server CPU per pair (service) vs per request (anchor)", f"{cpu * 1e6:.0f} us",
            f"{anchor_cpu * 1e6:.0f} us", cpu_ratio, ">= 0.5x (the same target, idle machine)"),
    ]


async def store_latency(held: int, ops: int = 3000) -> float:
    """Median seconds of one request+release in the memory store with ``held`` locks held."""
    store = MemoryStore()
    batch = 200
    for start in range(0, held, batch):
        names = [f"held{j}" for j in range(start, min(held, start + batch))]
        await store.request(LockRequest(device_names=names, lock_type=LockType.MANUAL_OPERATOR,
                                        user_id="filler", timeout=3600))
    samples = []
    for i in range(ops):
        t0 = time.perf_counter()
        grant = await store.request(LockRequest(device_name=f"op{i % 10}.x", lock_type=LockType.MANUAL_OPERATOR,
                                                user_id="b", timeout=60))
        await store.release(grant.lock_key)
        samples.append(time.perf_counter() - t0)
    return percentile(samples, 50)


async def http_latency(url: str, ops: int = 2000) -> float:
    async with aiohttp.ClientSession() as session:
        samples = []
        for i in range(ops):
            t0 = time.perf_counter()
            body = {"device_name": f"probe{i % 10}", "lock_type": "MANUAL_OPERATOR", "user_id": "b"}
            async with session.post(f"{url}/api/lock/request", json=body) as r:
                key = (await r.json())["lock_key"]
            async with session.post(f"{url}/api/lock/release", json={"lock_key": key}) as r:
                await r.read()
            samples.append(time.perf_counter() - t0)
    return percentile(samples, 50)


async def fill(url: str, held: int, prefix: str) -> None:
    async with aiohttp.ClientSession() as session:
        for start in range(0, held, 200):
            names = [f"{prefix}{j}" for j in range(start, min(held, start + 200))]
            body = {"device_names": names, "lock_type": "MANUAL_OPERATOR", "user_id": "filler", "timeout": 3600}
            async with session.post(f"{url}/api/lock/request", json=body) as r:
                assert r.status == 200, await r.text()


def stalled_subscriber(url: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads a byte."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


async def fan_out(url: str, subscribers: int = 500, events: int = 10, stalled: int = 0,
                  prefix: str = "fan") -> list[float]:
    """Seconds from sending a lock request to each subscriber receiving its event."""
    stuck = [stalled_subscriber(url) for _ in range(stalled)]
    ws_url = url.replace("http://", "ws://") + "/ws"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = []
        for _ in range(subscribers):
            ws = await session.ws_connect(ws_url, max_msg_size=0)
            msg = await ws.receive_json()
            assert msg["type"] == "initial_status"
            sockets.append(ws)
        # the stalled ones are flooded with events they never read
        for i in range(200 if stalled else 0):
            body = {"device_name": f"{prefix}-flood{i}", "lock_type": "MANUAL_OPERATOR", "user_id": "f", "timeout": 60}
            async with session.post(f"{url}/api/lock/request", json=body) as r:
                await r.read()
        for ws in sockets:  # drain the flood
            while True:
                try:
                    await asyncio.wait_for(ws.receive(), 0.001 if not stalled else 0.05)
                except asyncio.TimeoutError:
                    break
        delays: list[float] = []
        for i in range(events):
            device = f"{prefix}{i}"
            received: dict[int, float] = {}

            async def wait_for(k: int, ws: aiohttp.ClientWebSocketResponse, device: str = device,
                               received: dict[int, float] = received) -> None:
                while True:
                    msg = await ws.receive_json()
                    if msg.get("type") == "lock_update" and msg.get("device_name") == device:
                        received[k] = time.perf_counter()
                        return

            waiters = [asyncio.create_task(wait_for(k, ws)) for k, ws in enumerate(sockets)]
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            body = {"device_name": device, "lock_type": "MANUAL_OPERATOR", "user_id": "fan"}
            async with session.post(f"{url}/api/lock/request", json=body) as r:
                await r.read()
            await asyncio.wait_for(asyncio.gather(*waiters), 30)
            delays.extend(t - t0 for t in received.values())
        for ws in sockets:
            await ws.close()
    for s in stuck:
        s.close()
    return delays


async def main(lines: list[str]) -> None:
    small, big = await store_latency(10), await store_latency(100_000)
    lines.append(row("store request+release, 100,000 vs 10 held", f"{big * 1e6:.1f} us",
                     f"{small * 1e6:.1f} us at 10", big / small, "flat (~1x)"))
    with service("memory") as url:
        await fill(url, 10, "few")
        http_small = await http_latency(url)
        await fill(url, 100_000 - 10, "many")
        await asyncio.sleep(5)  # let the service drain the 100,000 events of the fill first
        http_big = await http_latency(url)
    lines.append(row("HTTP request+release p50, 100,000 vs 10 held", f"{http_big * 1e3:.2f} ms",
                     f"{http_small * 1e3:.2f} ms at 10", http_big / http_small, "flat (~1x)"))

    with service("memory") as url:
        plain = await fan_out(url)
        with_stalled = await fan_out(url, stalled=1, prefix="fan-stalled")
    p99, p99s = percentile(plain, 99), percentile(with_stalled, 99)
    lines.append(row("event -> 500 WebSocket subscribers, p99", f"{p99 * 1e3:.1f} ms",
                     "target 100 ms", p99 / 0.1, "<= 1.0x (100 ms)"))
    lines.append(row("same, with a stalled subscriber, p99", f"{p99s * 1e3:.1f} ms",
                     f"{p99 * 1e3:.1f} ms without", p99s / p99, "~1x, <= 100 ms"))
    print("\n".join(lines))


if __name__ == "__main__":
    table = [HEADER, *throughput()]  # its own event loops (uvloop), before the rest
    asyncio.run(main(table))
