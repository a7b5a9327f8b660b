"""Real holders in the preemption handshake: a holder process that acknowledges, one frozen
with SIGSTOP and one killed (maintenance is answered at the deadline), and an acknowledgement
given to another replica of the service on the same Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

#: Acknowledgement deadline of the services here.
ACK_TIMEOUT = 1.0

HOLDER = textwrap.dedent("""
    import asyncio, sys
    from bs_coordination.client import DeviceCoordinationClient

    async def main(url):
        async with DeviceCoordinationClient(url) as client:
            answer = await client.request_lock("m1", "QUEUE_EXECUTING", "holder_proc",
                                               acknowledge_preemption=True)
            key, token = answer.lock_key, answer.token
            acked = asyncio.Event()

            async def on_update(device, lock, action):
                if action == "preempted" and lock.token == token:
                    await client.acknowledge_preemption(key, device)
                    acked.set()

            client.add_lock_update_callback(on_update)
            await client.start_websocket_monitoring()
            print("ready", flush=True)
            await acked.wait()
            print("acknowledged", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1]))
""")


@pytest.fixture
def holder(live_ack_service: Any) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, live_ack_service.url],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def live_ack_service(service_factory: Any) -> Any:
    return service_factory("memory", preempt_ack_timeout=ACK_TIMEOUT)


def _maintenance(url: str) -> tuple[dict[str, Any], float]:
    """MAINTENANCE takes m1; the answer and how long it took (the request alone: the client,
    whose set-up loads a CA bundle, is made before the clock starts, and connected)."""
    with httpx.Client(base_url=url, timeout=30) as http:
        http.get("/api/health/live")
        start = time.monotonic()
        r = http.post("/api/lock/request", json={
            "device_name": "m1", "lock_type": "MAINTENANCE", "user_id": "bob"})
        took = time.monotonic() - start
    assert r.status_code == 200, r.text
    return r.json(), took


def test_a_live_holder_acknowledges(live_ack_service: Any,
                                    holder: subprocess.Popen[str]) -> None:
    body, took = _maintenance(live_ack_service.url)
    assert body["acknowledged"] is True
    assert took < ACK_TIMEOUT
    assert holder.stdout is not None and holder.stdout.readline().strip() == "acknowledged"


def test_a_frozen_holder_does_not_block_maintenance(live_ack_service: Any,
                                                    holder: subprocess.Popen[str]) -> None:
    os.kill(holder.pid, signal.SIGSTOP)
    body, took = _maintenance(live_ack_service.url)
    assert body["acknowledged"] is False
    assert ACK_TIMEOUT <= took <= ACK_TIMEOUT + 0.5
    assert body["preempted"][0]["preemption_ack"] == "timed_out"


def test_a_killed_holder_does_not_block_maintenance(live_ack_service: Any,
                                                    holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait(10)
    body, took = _maintenance(live_ack_service.url)
    assert body["acknowledged"] is False
    assert ACK_TIMEOUT <= took <= ACK_TIMEOUT + 0.5


def test_an_acknowledgement_given_to_another_replica_answers_the_preemptor(
        redis_server: Any, service_factory: Any) -> None:
    a = service_factory(redis_server.url, preempt_ack_timeout=5.0)
    b = service_factory(redis_server.url, preempt_ack_timeout=5.0)
    held = httpx.post(b.url + "/api/lock/request", json={
        "device_name": "m1", "lock_type": "QUEUE_EXECUTING", "user_id": "queue",
        "acknowledge_preemption": True}).json()
    answer: dict[str, Any] = {}

    def preempt() -> None:
        answer["body"], answer["took"] = _maintenance(a.url)

    t = threading.Thread(target=preempt)
    t.start()
    deadline = time.monotonic() + 5
    while True:  # replica B sees the handshake pending
        status = httpx.get(b.url + "/api/locks/device/m1").json()
        if status["preempted"] and status["preempted"][0]["preemption_ack"] == "pending":
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = httpx.post(b.url + "/api/lock/ack", json={"lock_key": held["lock_key"]})
    assert r.status_code == 200 and len(r.json()["acknowledged"]) == 1
    t.join(10)
    assert answer["body"]["acknowledged"] is True
    assert answer["took"] < 2.0  # released by the acknowledgement, not the 5 s deadline
