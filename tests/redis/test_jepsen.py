"""A Jepsen-style "lock-set" check: worker processes hold the lock on one device through two
service replicas on one Redis and read-modify-write a shared counter in a resource that
refuses stale fencing tokens. One worker is SIGSTOPped past its lease while it holds the lock;
when it wakes, its write must be refused, and no update may be lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WORKER = Path(__file__).with_name("jepsen_worker.py")
LEASE = 0.5
ITERATIONS = 6


@dataclass
class FencedCounter:
    """The guarded resource: a counter that refuses any token below the highest it has seen."""

    value: int = 0
    highest: int = 0
    accepted: list[tuple[int, int, int]] = field(default_factory=list)  # token, before, after
    refused: list[int] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _admit(self, token: int) -> bool:
        if token < self.highest:
            self.refused.append(token)
            return False
        self.highest = token
        return True

    async def read(self, request: web.Request) -> web.Response:
        token = int((await request.json())["token"])
        if not self._admit(token):
            return web.json_response({"stale": True}, status=409)
        return web.json_response({"value": self.value})

    async def write(self, request: web.Request) -> web.Response:
        body = await request.json()
        token, new = int(body["token"]), int(body["value"])
        if not self._admit(token):
            return web.json_response({"stale": True}, status=409)
        self.accepted.append((token, self.value, new))
        self.value = new
        self.changed.set()
        return web.json_response({"value": self.value})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _worker(service: str, resource: str, name: str, pause: float = 0.0
                  ) -> asyncio.subprocess.Process:
    args = [str(WORKER), "--service", service, "--resource", resource, "--name", name,
            "--iterations", str(ITERATIONS), "--lease", str(LEASE)]
    if pause:
        args += ["--pause-after-read", str(pause)]
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE)


async def test_a_paused_holder_past_its_lease_cannot_write(redis_server, spawn_service) -> None:
    a, b = spawn_service(redis_server.url), spawn_service(redis_server.url)
    counter = FencedCounter()
    app = web.Application()
    app.router.add_post("/read", counter.read)
    app.router.add_post("/write", counter.write)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    resource = f"http://127.0.0.1:{port}"
    procs: list[asyncio.subprocess.Process] = []
    try:
        victim = await _worker(a.url, resource, "victim", pause=1.0)
        procs.append(victim)
        assert victim.stdout is not None
        line = (await asyncio.wait_for(victim.stdout.readline(), 30)).decode().split()
        assert line[0] == "HOLD", line
        held_token = int(line[1])
        victim.send_signal(signal.SIGSTOP)  # it holds the lock and has read the counter
        others = [await _worker((a, b)[i % 2].url, resource, f"worker{i}") for i in range(3)]
        procs += others

        # Others may only proceed once the victim's lease ran out and was swept.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not (counter.highest > held_token and len(counter.accepted) >= 2):
            assert loop.time() < deadline, "nobody got the lock after the victim's lease ran out"
            counter.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(counter.changed.wait(), 1)
        victim.send_signal(signal.SIGCONT)

        outputs = []
        for p in procs:
            out, _ = await asyncio.wait_for(p.communicate(), 90)
            outputs.append(out.decode())
            assert p.returncode == 0, out.decode()
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                await p.wait()
        await runner.cleanup()

    victim_writes = [ln.split() for ln in outputs[0].splitlines() if ln.startswith("WRITE")]
    assert victim_writes[0] == ["WRITE", str(held_token), "409"], outputs[0]
    assert held_token in counter.refused
    # No lost update: every accepted write added one to the value it replaced.
    assert all(after == before + 1 for _, before, after in counter.accepted)
    assert counter.value == len(counter.accepted) >= ITERATIONS * 3
    # No stale token accepted: accepted tokens never go down.
    tokens = [t for t, _, _ in counter.accepted]
    assert tokens == sorted(tokens)

    # The service never had two holders: on "ledger" every grant follows the previous
    # holder's release or expiry.
    async with httpx.AsyncClient(timeout=10) as client:
        events = (await client.get(f"{b.url}/api/events")).json()["events"]
    holder = None
    for e in events:
        if e["action"] in ("acquired", "restored"):
            assert holder is None, f"granted while token {holder} still held the lock"
            holder = e["lock"]["token"]
        elif e["action"] in ("released", "expired", "force_released"):
            assert e["lock"]["token"] == holder
            holder = None
    grants = [e["lock"]["token"] for e in events if e["action"] == "acquired"]
    assert grants == sorted(grants) and len(grants) == len(set(grants))
    assert any(e["action"] == "expired" and e["lock"]["token"] == held_token for e in events)
