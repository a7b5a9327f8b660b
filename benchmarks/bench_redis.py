"""Lock+release pairs/s through the service on the Redis store, against redis-py's own
``redis.asyncio.lock.Lock`` on the same Redis, with the same concurrency, in one run.

    python benchmarks/bench_redis.py [--clients 50] [--seconds 5] [--rounds 3]

Starts a private ``redis-server`` on a free port (append-only, ``--appendfsync``), then:

1. **anchor**: ``--clients`` asyncio tasks, each looping ``Lock.acquire()`` + ``release()``
   on its own lock name (no contention, so redis-py's 0.1 s polling never runs);
2. **service**: ``uvicorn --factory bs_coordination.service:create_app`` on the Redis store
   (one worker, no access log) and ``--clients`` keep-alive connections of the lean client
   of ``_load.py``, each looping POST ``/api/lock/request`` + POST ``/api/lock/release`` on
   its own device;
3. for context, the same pairs on the ``RedisStore`` API in-process (no HTTP), and through the
   service on the memory store (no Redis), to show where the time goes.

The four run back to back, ``--rounds`` times (interleaved, so a burst of other load on a shared
machine hits one round rather than one contender); each round's ratios are printed and the
round with the median service/anchor ratio in full.

Prints pairs/s, p50 and p99 latency of a pair, the ratio service/anchor (target >= 0.5), and
the Redis round trips and commands per operation, counted in-process on a ``RedisStore``: a
round trip is one script call the operation waits for (alone, with a warm cache: one per
request and one per release; under load the operations that arrive while a call is in flight
share the next one: group commit, ``stores/txn.py``), counted by Redis itself (``INFO
commandstats``).
Not a test: figures depend on the machine (load generator and service share it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys

import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import UVICORN, free_port, private_redis, run_clients, wait_port
from _load import Connection


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_anchor(url: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    r = aioredis.Redis.from_url(url, max_connections=clients + 10)
    # One Lock per task: a shared instance would mix tokens (thread_local is per thread).
    locks = [r.lock(f"bench:anchor:{i}", timeout=30, thread_local=False) for i in range(clients)]

    async def pair(i: int) -> None:
        await locks[i].acquire()
        await locks[i].release()

    try:
        return await run_clients(clients, seconds, pair)
    finally:
        await r.aclose()


async def bench_service(base: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    # The lean keep-alive client of ``_load.py``: a general-purpose HTTP client would spend as
    # much CPU per request as the service, and be the thing measured.
    conns = [await Connection.open(base) for _ in range(clients)]

    async def pair(i: int) -> None:
        device = f"bench{i}"
        status, body = await conns[i].post_json("/api/lock/request", {
            "device_name": device, "lock_type": "MANUAL_OPERATOR", "user_id": "bench",
            "timeout": 30})
        assert status == 200, body
        status, body = await conns[i].post_json("/api/lock/release", {
            "lock_key": body["lock_key"], "device_name": device})
        assert status == 200, body

    try:
        return await run_clients(clients, seconds, pair)
    finally:
        for c in conns:
            c.close()


class Counting:
    """Counts the ``CAS`` script calls Redis ran (``INFO commandstats``: ``EVALSHA``), i.e. the
    round trips of a ``RedisStore``'s operations while nothing else runs scripts."""

    def __init__(self, url: str) -> None:
        self._info = aioredis.Redis.from_url(url)
        self._start = 0

    async def _evalsha(self) -> int:
        stats = await self._info.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    async def reset(self) -> None:
        self._start = await self._evalsha()

    async def calls(self) -> int:
        return await self._evalsha() - self._start

    async def close(self) -> None:
        await self._info.aclose()


async def bench_store(url: str, clients: int, seconds: float
                      ) -> tuple[float, list[float], dict[str, float]]:
    """The store API in-process (no HTTP): what the Redis store itself costs."""
    from bs_coordination.models import LockRequest, LockType
    from bs_coordination.stores.redis import RedisStore

    store = RedisStore(url, prefix="bench-direct")
    counting = Counting(url)
    reqs = [LockRequest(device_name=f"direct{i}", lock_type=LockType.MANUAL_OPERATOR,
                        user_id="bench") for i in range(clients)]
    ops = 0

    async def pair(i: int) -> None:
        nonlocal ops
        grant = await store.request(reqs[i])
        await store.release(grant.lock_key, f"direct{i}")
        ops += 2

    try:
        await counting.reset()
        rate, lat = await run_clients(clients, seconds, pair)
        return rate, lat, {"calls_per_op": await counting.calls() / ops}
    finally:
        await counting.close()
        await store.close()


def start_service(store: str) -> tuple[subprocess.Popen[bytes], str]:
    """The service under uvicorn with the settings of the service benchmark's runs (one
    worker, no access log)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATION_")}
    proc = subprocess.Popen(
        [sys.executable, *UVICORN, "--port", str(port), "--factory",
         "bs_coordination.service:create_app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env={**env, "COORDINATION_STORE": store})
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


async def round_trips(url: str, n: int = 200) -> dict[str, float]:
    """Round trips and Redis commands per request and per release, warm, one replica."""
    from bs_coordination.models import LockRequest, LockType
    from bs_coordination.stores.redis import RedisStore

    store = RedisStore(url, prefix="bench-rt")
    counting = Counting(url)
    info = aioredis.Redis.from_url(url)

    async def commands() -> int:
        return int((await info.info("stats"))["total_commands_processed"])

    req = LockRequest(device_name="rt", lock_type=LockType.MANUAL_OPERATOR, user_id="bench")
    grant = await store.request(req)  # warm the cache
    await store.release(grant.lock_key, "rt")
    out: dict[str, float] = {}
    try:
        # Each INFO asked for is a command too: ``commands()`` and ``counting`` add 2 per read.
        await counting.reset()
        c0 = await commands()
        for _ in range(n):
            g = await store.request(req)
            await store.release(g.lock_key, "rt")
        out["pair_round_trips"] = await counting.calls() / n
        out["pair_commands"] = (await commands() - c0 - 2) / n
        # Separate the two halves: a request alone, then a release alone.
        await counting.reset()
        c0 = await commands()
        g = await store.request(req)
        out["request_round_trips"] = await counting.calls()
        out["request_commands"] = await commands() - c0 - 2
        await counting.reset()
        c0 = await commands()
        await store.release(g.lock_key, "rt")
        out["release_round_trips"] = await counting.calls()
        out["release_commands"] = await commands() - c0 - 2
    finally:
        await counting.close()
        await info.aclose()
        await store.close()
    return out


def report(name: str, rate: float, lat: list[float]) -> None:
    print(f"{name:<34} {rate:9.0f} pairs/s   p50 {1000 * pct(lat, 0.5):6.2f} ms   "
          f"p99 {1000 * pct(lat, 0.99):6.2f} ms   (n={len(lat)})")


async def one_round(args: argparse.Namespace, url: str, services: dict[str, str]
                    ) -> dict[str, tuple[float, list[float]]]:
    """Each contender once, back to back: anchor, service on Redis, store alone, service on
    memory (the last two say where the time goes)."""
    out: dict[str, tuple[float, list[float]]] = {}
    out["anchor"] = await bench_anchor(url, args.clients, args.seconds)
    out["service"] = await bench_service(services["redis"], args.clients, args.seconds)
    rate, lat, load = await bench_store(url, args.clients, args.seconds)
    out["store"] = (rate, lat)
    out["load"] = (load["calls_per_op"], [])
    out["memory"] = await bench_service(services["memory"], args.clients, args.seconds)
    return out


async def main_async(args: argparse.Namespace, url: str) -> None:
    rt = await round_trips(url)
    procs = {}
    services = {}
    for name, store in (("redis", url), ("memory", "memory")):
        procs[name], services[name] = start_service(store)
    try:
        rounds = [await one_round(args, url, services) for _ in range(args.rounds)]
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)

    def ratio(r: dict[str, tuple[float, list[float]]], name: str) -> float:
        return r[name][0] / r["anchor"][0]

    print(f"\nlock+release, {args.clients} concurrent clients, {args.seconds:g} s measured per "
          f"contender, {args.rounds} interleaved round(s), redis appendfsync={args.appendfsync}")
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: service/anchor {ratio(r, 'service'):.2f}, store alone/anchor "
              f"{ratio(r, 'store'):.2f}, service on memory/anchor {ratio(r, 'memory'):.2f}")
    # The round with the median service/anchor ratio is reported in full.
    r = sorted(rounds, key=lambda r: ratio(r, "service"))[len(rounds) // 2]
    print("median round:")
    report("redis-py Lock (anchor)", *r["anchor"])
    report("service, Redis store, 1 worker", *r["service"])
    print(f"ratio service/anchor: {ratio(r, 'service'):.2f} (target >= 0.5)")
    print("context:")
    report("  RedisStore API in-process, no HTTP", *r["store"])
    report("  service, memory store, 1 worker", *r["memory"])
    print(f"  ratios to the anchor: store alone {ratio(r, 'store'):.2f}, "
          f"HTTP service on memory {ratio(r, 'memory'):.2f}")
    print(f"mean pair latency: anchor {1000 * statistics.fmean(r['anchor'][1]):.2f} ms, "
          f"service {1000 * statistics.fmean(r['service'][1]):.2f} ms")
    print("Redis round trips per operation (script calls waited for; warm cache, one replica): "
          f"request {rt['request_round_trips']:g}, release {rt['release_round_trips']:g}, "
          f"mean per pair {rt['pair_round_trips']:.2f}; redis-py Lock: acquire 1, release 1")
    print(f"under load ({args.clients} clients, store alone): "
          f"{r['load'][0]:.3f} round trips per operation")
    print("Redis commands executed per operation (including those run inside the CAS "
          f"script): request {rt['request_commands']:g}, release {rt['release_commands']:g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds (the machine is shared: one round can be unlucky)")
    p.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    args = p.parse_args()
    with private_redis(args.appendfsync) as url:
        asyncio.run(main_async(args, url))


if __name__ == "__main__":
    main()
