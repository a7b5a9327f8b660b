"""Redis with Sentinel: a primary, a replica and three Sentinels on loopback, the service as a
real process on ``redis+sentinel://``. A failover forced mid-load (``SENTINEL FAILOVER``): the
service keeps serving without a restart, fails closed meanwhile (503, never a grant it cannot
vouch for), loses no acknowledged lock (``WAIT 1`` after each commit, the default with
Sentinel, and ``min-replicas-to-write 1``), never grants one device to two holders, and its
tokens never go back; a WebSocket client connected throughout sees the grants made after it.
The figures are printed."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis_ha import SentinelGroup, sentinel_group
from websockets.asyncio.client import connect

from bs_coordination.stores.redis_keys import KeySpace

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WORKERS = 8
DEVICES = 4
LEASE = 3.0  # a grant answered 503 (outcome unknown) blocks its device this long at most
LOAD_BEFORE = 2.0  # seconds of load before the failover
SERVED_AFTER = 2.0  # seconds of load once grants come from the new primary
GIVE_UP = 40.0  # the service must serve again within this
PROMPTLY = 15.0  # a WebSocket client sees a grant's event within this


@pytest.fixture(params=[1, 2], ids=["1 replica", "2 replicas"])
def group(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SentinelGroup]:
    """The new primary has one replica fewer than the old one until Sentinel turns the old
    primary into its replica (about 10 s: Sentinel's own delay), and ``WAIT`` for every
    replica refuses writes until then. ``WAIT`` for fewer replicas than there are keeps
    serving, but loses the changes only the other replicas acknowledged (measured once here,
    2 replicas and ``WAIT 1``: 106 of 320 acknowledged grants lost, 2.8 s without service)."""
    with sentinel_group(tmp_path, request.param) as g:
        yield g


@dataclass
class Held:
    device: str
    token: int
    granted: float  # when the grant was answered
    released: float | None = None  # when the release that ended it was sent
    release_status: int | None = None


def overlaps(held: list[Held]) -> int:
    """Pairs of acknowledged grants of one device whose holding times overlap."""
    count = 0
    by_device: dict[str, list[Held]] = {}
    for h in held:
        by_device.setdefault(h.device, []).append(h)
    for items in by_device.values():
        items.sort(key=lambda h: h.granted)
        for i, a in enumerate(items):
            for b in items[i + 1:]:
                if b.granted < (a.released if a.released is not None else float("inf")):
                    count += 1
    return count


def replay(entries: list[tuple[str, dict[str, str]]]) -> tuple[int, set[tuple[str, int]],
                                                                set[tuple[str, int]]]:
    """Replay the event log: (grants made while the device had an active holder, the
    (device, token) acquired, the (device, token) released)."""
    holder: dict[str, int] = {}
    doubles = 0
    acquired: set[tuple[str, int]] = set()
    released: set[tuple[str, int]] = set()
    for _, fields in entries:
        event = json.loads(fields["e"])
        device, token = event["lock"]["device_name"], int(event["lock"]["token"])
        if event["action"] == "acquired":
            if device in holder:
                doubles += 1
            holder[device] = token
            acquired.add((device, token))
        elif event["action"] in ("released", "expired", "force_released"):
            if holder.get(device) == token:
                del holder[device]
            if event["action"] == "released":
                released.add((device, token))
    return doubles, acquired, released


async def test_a_failover_mid_load_loses_no_acknowledged_lock(group: SentinelGroup,
                                                              spawn_service, capsys) -> None:  # type: ignore[no-untyped-def]
    replicas = len(group.servers) - 1
    # WAIT for every replica: 1 is the default with Sentinel.
    svc = spawn_service(group.url() if replicas == 1 else group.url(f"wait_replicas={replicas}"))
    old_primary = group.primary_port()
    answers: list[tuple[float, int]] = []  # (when answered, status)
    held: list[Held] = []
    stop = False
    failover_at: float | None = None
    new_primary_at: float | None = None

    async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
        r = await http.post(path, json=body)
        answers.append((time.monotonic(), r.status_code))
        if r.status_code == 503:
            assert "lock_key" not in r.text and "token" not in r.json()
        else:
            # 403/404: a release after the lock's lease ran out (during the outage) finds
            # another holder or none.
            assert r.status_code in (200, 403, 404, 409), r.text
        return r

    async def worker(i: int, http: httpx.AsyncClient) -> None:
        device = f"m{i % DEVICES}"
        while not stop:
            r = await post(http, "/api/lock/request", {
                "device_name": device, "lock_type": "MANUAL_OPERATOR", "user_id": f"w{i}",
                "timeout": LEASE})
            if r.status_code != 200:
                await asyncio.sleep(0.02)
                continue
            h = Held(device, int(r.json()["token"]), time.monotonic())
            held.append(h)
            await asyncio.sleep(0.02)
            unknown: float | None = None  # a release answered 503 may have happened
            while True:
                sent = time.monotonic()
                rr = await post(http, "/api/lock/release",
                                {"lock_key": r.json()["lock_key"], "device_name": device})
                if rr.status_code == 503:
                    unknown = sent
                    await asyncio.sleep(0.02)
                    continue
                h.release_status = rr.status_code
                if rr.status_code == 200:
                    h.released = sent
                else:  # released by a 503'd attempt, or its lease ran out (from before h.granted)
                    h.released = min(unknown or sent, h.granted + LEASE)
                break

    seen: set[tuple[str, int]] = set()  # (device, token) of the acquired events on the WebSocket

    async def watch() -> None:
        async with connect(svc.ws_url) as ws:
            async for text in ws:
                msg = json.loads(text)
                if msg.get("type") == "lock_update" and msg["action"] == "acquired":
                    seen.add((msg["device_name"], int(msg["lock"]["token"])))

    watcher = asyncio.create_task(watch())
    async with httpx.AsyncClient(base_url=svc.url, timeout=15) as http:
        tasks = [asyncio.create_task(worker(i, http)) for i in range(WORKERS)]
        try:
            await asyncio.sleep(LOAD_BEFORE)
            failover_at = time.monotonic()
            await asyncio.to_thread(group.failover)
            while True:
                assert time.monotonic() - failover_at < GIVE_UP, "no new primary in time"
                if await asyncio.to_thread(group.primary_port) != old_primary:
                    break
                await asyncio.sleep(0.05)
            new_primary_at = time.monotonic()
            while not any(h.granted > new_primary_at + SERVED_AFTER for h in held):
                assert time.monotonic() - failover_at < GIVE_UP, (
                    "the service did not serve again after the failover:\n"
                    + svc.log.read_text()[-3000:])
                await asyncio.sleep(0.05)
        finally:
            stop = True
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    assert svc.proc.poll() is None  # the same service process served throughout
    # The service's event tail followed the new primary: its WebSocket clients see new grants.
    late = {(h.device, h.token) for h in held if h.granted > new_primary_at + SERVED_AFTER}
    deadline = time.monotonic() + PROMPTLY
    while not late <= seen and time.monotonic() < deadline and not watcher.done():
        await asyncio.sleep(0.05)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    assert late and late <= seen, f"not on the WebSocket: {sorted(late - seen)[:5]}"

    new_primary = group.primary_port()
    assert new_primary != old_primary
    with redis.Redis(port=new_primary, decode_responses=True) as r:
        entries = r.xrange(KeySpace().events)
    doubles_in_log, acquired, released = replay(entries)  # type: ignore[arg-type]
    lost_grants = [h for h in held if (h.device, h.token) not in acquired]
    lost_releases = [h for h in held
                     if h.release_status == 200 and (h.device, h.token) not in released]
    double_grants = overlaps(held)

    served = sorted(t for t, status in answers if status != 503)
    around = [t for t in served if t >= failover_at - 1.0]
    gap = max((b - a for a, b in itertools.pairwise(around)), default=0.0)
    refused = sum(1 for _, status in answers if status == 503)
    before = [h.token for h in held if h.granted < failover_at]
    after = [h.token for h in held if h.granted > new_primary_at]
    per_device_rising = all(
        [h.token for h in sorted((x for x in held if x.device == d), key=lambda x: x.granted)]
        == sorted({h.token for h in held if h.device == d})
        for d in {h.device for h in held})
    with capsys.disabled():
        print(f"\nSentinel failover mid-load ({replicas} replica(s), {WORKERS} "
              f"clients, {DEVICES} devices, WAIT {replicas}, "
              f"min-replicas-to-write 1): seconds without service {gap:.2f}; 503 answers "
              f"{refused}; acknowledged grants {len(held)}, lost {len(lost_grants)}; "
              f"acknowledged releases lost {len(lost_releases)}; double grants "
              f"{double_grants} (in the replayed log {doubles_in_log}); tokens rising per "
              f"device {per_device_rising}, after the failover above before "
              f"{min(after, default=0) > max(before, default=0)}")
    assert before and after
    assert lost_grants == [] and lost_releases == []
    assert double_grants == 0 and doubles_in_log == 0
    assert per_device_rising
    assert min(after) > max(before)
