"""What the Redis store itself costs the service: process CPU per request+release pair on the
``RedisStore`` API in process (no HTTP), against the same pairs on the ``MemoryStore`` in the
same run. Run: ``python benchmarks/bench_store_cpu.py [--clients 50] [--pairs 20000]``.

The service is CPU-bound on one core, so this is the part of a lock operation's cost that the
store adds (``bench_redis.py`` measures the whole service against redis-py's ``Lock``). Starts a
private ``redis-server`` (append-only, ``everysec``) on a free port. Rounds alternate between
the two stores; the median of each is reported. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import HEADER, private_redis, row

from bs_coordination.models import LockRequest, LockType
from bs_coordination.stores import MemoryStore, Store
from bs_coordination.stores.redis import RedisStore


async def cpu_per_pair(store: Store, clients: int, pairs: int) -> float:
    """Microseconds of this process's CPU per request+release, ``clients`` concurrent tasks
    each on its own device (after a warm-up)."""
    await store.start()
    reqs = [LockRequest(device_name=f"cpu{i}", lock_type=LockType.MANUAL_OPERATOR,
                        user_id="bench") for i in range(clients)]

    async def loop(i: int, n: int) -> None:
        for _ in range(n):
            grant = await store.request(reqs[i])
            await store.release(grant.lock_key, f"cpu{i}")

    try:
        await asyncio.gather(*(loop(i, 50) for i in range(clients)))
        start = time.process_time()
        await asyncio.gather(*(loop(i, pairs // clients) for i in range(clients)))
        return (time.process_time() - start) / (pairs // clients * clients) * 1e6
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    memory, redis_cpu = [], []
    with private_redis() as url:
        for i in range(args.rounds):
            memory.append(asyncio.run(cpu_per_pair(MemoryStore(), args.clients, args.pairs)))
            redis_cpu.append(asyncio.run(cpu_per_pair(
                RedisStore(url, prefix=f"bench-cpu{i}"), args.clients, args.pairs)))
    m, r = statistics.median(memory), statistics.median(redis_cpu)
    print(HEADER)
    print(row(f"CPU per request+release, Redis store API in process, {args.clients} tasks "
              f"(median of {args.rounds})", f"{r:.1f} us", f"memory store {m:.1f} us", r / m,
              "context (the service's Redis cost)"))


if __name__ == "__main__":
    main()
