"""Across a scripted session (grant, preempt, restore, renew, release, expire, force-release,
refusals) no lock key and no API key appears in any status response, event, WebSocket frame or
log line of the service. The service runs as its own process (``python -m
bs_coordination.service``, log level DEBUG, access log on), so every line it logs is captured."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from security_helpers import auth, lock_body
from websockets.asyncio.client import connect

from bs_coordination.locktable import hash_key

EVENT_WAIT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, store: str, key_file: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "bs_coordination.service", "--host", "127.0.0.1",
             "--port", str(self.port), "--store", store, "--api-keys", str(key_file),
             "--log-level", "DEBUG"],
            stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/api/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service did not start:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()

    def output(self) -> str:
        return self.log.read_text("utf-8", "replace")


@pytest.fixture
def service_process(store_url: str, key_file: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(store_url, key_file, tmp_path / "service.log")
    try:
        yield svc
    finally:
        svc.stop()


async def test_no_secret_in_status_events_frames_or_logs(service_process, keys) -> None:
    svc = service_process
    lock_keys: list[str] = []
    public: list[str] = []  # every text a non-acquirer can see

    clients = {who: httpx.AsyncClient(base_url=svc.url, headers=auth(key), timeout=30)
               for who, key in keys.items()}
    alice, bob, qs, root, reader = (clients[w] for w in ("alice", "bob", "qs", "root", "reader"))

    async def grant(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
        r = await client.post("/api/lock/request", json=body)
        assert r.status_code == 200, r.text
        lock_keys.append(r.json()["lock_key"])
        return str(r.json()["lock_key"])

    async def snapshot() -> None:
        for path in ("/api/locks/status", "/api/locks/device/det1", "/api/locks/device/det3",
                     "/api/events?since=0"):
            r = await reader.get(path)
            assert r.status_code == 200, r.text
            public.append(r.text)

    async def ok(r: httpx.Response, status: int = 200) -> None:
        assert r.status_code == status, r.text
        public.append(r.text)  # answers to releases, renewals, refusals carry no key either

    try:
        async with connect(svc.url.replace("http", "ws") + "/ws",
                           additional_headers=auth(keys["reader"])) as ws:
            frames: list[str] = []

            async def until(action: str, device: str) -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + EVENT_WAIT
                while True:
                    text = str(await asyncio.wait_for(ws.recv(), deadline - loop.time()))
                    frames.append(text)
                    frame = json.loads(text)
                    if frame.get("action") == action and frame.get("device_name") == device:
                        return

            frames.append(str(await ws.recv()))  # initial_status
            # grant
            key_a = await grant(alice, lock_body("det1", user="alice"))
            await until("acquired", "det1")
            await snapshot()
            # preempt (a maintenance lock without a lease)
            key_m = await grant(root, lock_body("det1", "MAINTENANCE", timeout=None))
            await until("acquired", "det1")
            await snapshot()
            # refusals: bob has alice's key; a wrong API key; a guessed lock key
            await ok(await bob.post("/api/lock/release", json={"lock_key": key_a}), 403)
            await ok(await httpx.AsyncClient(base_url=svc.url).get(
                "/api/locks/status", headers=auth(keys["root"] + "x")), 401)
            await ok(await alice.post("/api/lock/release", json={"lock_key": "guess",
                                                                 "device_name": "det1"}), 403)
            await ok(await alice.post("/api/lock/request", json=lock_body("det1")), 409)
            # restore
            await ok(await root.post("/api/lock/release", json={"lock_key": key_m}))
            await until("restored", "det1")
            await snapshot()
            # renew, then release through the deprecated query form (the key in the URL)
            await ok(await alice.post("/api/lock/renew", json={"lock_key": key_a, "timeout": 60}))
            await ok(await alice.post("/api/lock/release",
                                      params={"lock_key": key_a, "device_name": "det1"}))
            await until("released", "det1")
            # expire
            await grant(qs, lock_body("det2", "QUEUE_EXECUTING", timeout=0.3, plan_uid="p-1"))
            await until("expired", "det2")
            await snapshot()
            # force-release
            await grant(alice, lock_body("det3", reason="tuning"))
            await ok(await root.post("/api/lock/force-release",
                                     json={"device_name": "det3", "reason": "stuck"}))
            await until("force_released", "det3")
            await ws.send(json.dumps({"type": "get_status"}))
            frames.append(str(await asyncio.wait_for(ws.recv(), EVENT_WAIT)))
            await snapshot()
    finally:
        for c in clients.values():
            await c.aclose()
    events = json.loads(public[-1])["events"]
    svc.stop()
    log = svc.output()

    # The session did what it says, so the checks below look at real traffic.
    assert [(e["action"], e["device_name"], e["actor"]) for e in events] == [
        ("acquired", "det1", "alice"), ("preempted", "det1", "root"), ("acquired", "det1", "root"),
        ("released", "det1", "root"), ("restored", "det1", "root"), ("renewed", "det1", "alice"),
        ("released", "det1", "alice"), ("acquired", "det2", "qs"), ("expired", "det2", None),
        ("acquired", "det3", "alice"), ("force_released", "det3", "root")]
    assert "POST /api/lock/release" in log and "/ws" in log, log[-3000:]
    assert "granted" in log and "force-released" in log and "refused" in log
    # At DEBUG the WebSocket handshake headers are logged: the key's header among them, redacted.
    assert "< authorization: <redacted>" in log

    secrets = {f"lock key {i}": k for i, k in enumerate(lock_keys)}
    secrets |= {f"hash of lock key {i}": hash_key(k) for i, k in enumerate(lock_keys)}
    secrets |= {f"API key of {who}": k for who, k in keys.items()}
    places = {"status and answers": public, "WebSocket frames": frames, "log": [log]}
    for place, texts in places.items():
        for what, secret in secrets.items():
            leaks = [t for t in texts if secret in t]
            assert not leaks, f"{what} appears in the {place}: {leaks[0][:300]}"
