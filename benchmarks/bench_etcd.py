"""Lock+release pairs/s through the service on each store (memory, Redis, etcd) against etcd's
own lock API (``Lock``/``Unlock`` of etcd's lock service, one lease per client), with the same
load generator, the same concurrency, on the same machine, in one run.

    python benchmarks/bench_etcd.py [--clients 50] [--seconds 5] [--rounds 3] [--shm]

Starts a private single-node ``etcd`` (Debian's etcd-server; data on disk, or on ``/dev/shm``
with ``--shm``) and a private ``redis-server`` (append-only, ``everysec``), then, in every round:

1. **anchor**: ``--clients`` keep-alive connections of the lean client of ``_load.py`` to etcd's
   own HTTP API (its gRPC gateway, ``/v3/lock/lock`` and ``/v3/lock/unlock``), each holding one
   lease and looping Lock + Unlock on a lock name of its own (no contention);
2. **service** on each store: ``uvicorn --factory bs_coordination.service:create_app`` (one
   worker, no access log), the same client looping POST ``/api/lock/request`` + POST
   ``/api/lock/release`` on a device of its own. The etcd store uses the same etcd as the anchor;
3. for context, the same pairs on the ``EtcdStore`` API in-process (no HTTP), and the **FastAPI
   ceiling**: a trivial FastAPI JSON endpoint (``_trivial_app.py``, one pydantic body, no work)
   under the same uvicorn settings, two requests per "pair". No service built on FastAPI with
   one worker can pass that figure; when it is below the anchor, the target cannot be met
   without leaving FastAPI (which the project does not do: no hand-written router).

Contenders run back to back, ``--rounds`` times (interleaved, so a burst of other load on the
shared machine hits one round rather than one contender). Prints, for the round with the median
etcd-store ratio, pairs/s, p50 and p99 of a pair, and each store's ratio to the anchor (target
>= 1.0), then every round's ratios. Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import UVICORN, free_port, percentile, private_redis, run_clients, trivial_app, wait_port
from _load import Connection, run

STORES = ("memory", "redis", "etcd")


@contextmanager
def private_etcd(shm: bool) -> Iterator[int]:
    """A private single-node etcd on free loopback ports; yields its client port."""
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    base = "/dev/shm" if shm else None
    with tempfile.TemporaryDirectory(prefix="bench-etcd-", dir=base) as d:
        client, peer = free_port(), free_port()
        c, p = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        with open(Path(d) / "etcd.log", "wb") as log:
            proc = subprocess.Popen(
                [binary, "--name", "bench", "--data-dir", str(Path(d) / "data"),
                 "--listen-client-urls", c, "--advertise-client-urls", c,
                 "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
                 "--initial-cluster", f"bench={p}", "--log-level", "warn", "--logger", "zap",
                 "--auto-compaction-mode", "revision", "--auto-compaction-retention", "100000"],
                stdout=log, stderr=log)
        try:
            wait_port(client)
            time.sleep(1.0)  # let it elect itself
            yield client
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def service(store: str) -> Iterator[str]:
    """The service under uvicorn on ``store`` (one worker, no access log)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATION_")}
    proc = subprocess.Popen([sys.executable, *UVICORN, "--port", str(port), "--factory",
                             "bs_coordination.service:create_app"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**env, "COORDINATION_STORE": store})
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def measure(url: str, clients: int, seconds: float,
                  setup: Callable[[Connection, int], Awaitable[object]],
                  pair: Callable[[Connection, int, object], Awaitable[None]]
                  ) -> tuple[float, list[float]]:
    """``clients`` connections looping ``pair``: 1 s warm-up, then ``seconds`` measured."""
    conns = [await Connection.open(url) for _ in range(clients)]
    try:
        state = [await setup(c, i) for i, c in enumerate(conns)]
        return await run_clients(clients, seconds, lambda i: pair(conns[i], i, state[i]))
    finally:
        for c in conns:
            c.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def etcd_lock_api(url: str, clients: int, seconds: float, tag: str) -> tuple[float, list[float]]:
    """The anchor: etcd's lock service, one lease per client, one lock name per client."""

    async def setup(conn: Connection, i: int) -> object:
        status, body = await conn.post_json("/v3/lease/grant", {"TTL": "60"})
        assert status == 200, body
        return body["ID"]

    async def pair(conn: Connection, i: int, lease: object) -> None:
        status, body = await conn.post_json("/v3/lock/lock", {"name": b64(f"{tag}/lock{i}"),
                                                              "lease": lease})
        assert status == 200, body
        status, body = await conn.post_json("/v3/lock/unlock", {"key": body["key"]})
        assert status == 200, body

    return await measure(url, clients, seconds, setup, pair)


async def through_service(url: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    async def setup(conn: Connection, i: int) -> object:
        return None

    async def pair(conn: Connection, i: int, _: object) -> None:
        device = f"bench{i}"
        status, body = await conn.post_json("/api/lock/request", {
            "device_name": device, "lock_type": "MANUAL_OPERATOR", "user_id": "bench", "timeout": 30})
        assert status == 200, body
        status, body = await conn.post_json("/api/lock/release", {"lock_key": body["lock_key"],
                                                                  "device_name": device})
        assert status == 200, body

    return await measure(url, clients, seconds, setup, pair)


async def fastapi_ceiling(url: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    """For context: two trivial FastAPI requests per pair (the most a FastAPI worker does)."""
    async def setup(conn: Connection, i: int) -> object:
        return None

    async def pair(conn: Connection, i: int, _: object) -> None:
        for _n in range(2):
            status, body = await conn.post_json("/echo", {"device_name": f"bench{i}", "user_id": "bench"})
            assert status == 200, body

    return await measure(url, clients, seconds, setup, pair)


async def store_alone(url: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    """For context: the same pairs on the ``EtcdStore`` API in this process (no HTTP)."""
    from bs_coordination.models import LockRequest, LockType
    from bs_coordination.stores.etcd import EtcdStore

    store = EtcdStore(url)
    await store.start()
    reqs = [LockRequest(device_name=f"direct{i}", lock_type=LockType.MANUAL_OPERATOR,
                        user_id="bench", timeout=30) for i in range(clients)]

    async def pair(i: int) -> None:
        grant = await store.request(reqs[i])
        await store.release(grant.lock_key, f"direct{i}")

    try:
        return await run_clients(clients, seconds, pair)
    finally:
        await store.close()


def line(name: str, rate: float, lat: list[float], anchor: float | None = None) -> str:
    ratio = f"   {rate / anchor:5.2f}x etcd lock API" if anchor else ""
    return (f"{name:<32} {rate:8.0f} pairs/s   p50 {1000 * percentile(lat, 50):7.2f} ms   "
            f"p99 {1000 * percentile(lat, 99):7.2f} ms{ratio}")


async def rounds(args: argparse.Namespace, etcd: str, services: dict[str, str], store_url: str,
                 trivial: str) -> list[dict[str, tuple[float, list[float]]]]:
    out = []
    for n in range(args.rounds):
        r = {"anchor": await etcd_lock_api(etcd, args.clients, args.seconds, f"round{n}")}
        for name in STORES:
            r[name] = await through_service(services[name], args.clients, args.seconds)
        r["alone"] = await store_alone(f"{store_url}-direct{n}", args.clients, args.seconds)
        r["ceiling"] = await fastapi_ceiling(trivial, args.clients, args.seconds)
        out.append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shm", action="store_true", help="etcd's data on /dev/shm (no disk fsync)")
    args = p.parse_args()
    with private_etcd(args.shm) as etcd_port, private_redis("everysec") as redis_url:
        etcd = f"http://127.0.0.1:{etcd_port}"
        urls = {"memory": "memory", "redis": redis_url,
                "etcd": f"etcd://127.0.0.1:{etcd_port}/bench"}
        with service(urls["memory"]) as m, service(urls["redis"]) as r, \
                service(urls["etcd"]) as e, trivial_app() as trivial:
            results = run(rounds(args, etcd, {"memory": m, "redis": r, "etcd": e}, urls["etcd"],
                                 trivial))

    def ratio(r: dict[str, tuple[float, list[float]]], name: str) -> float:
        return r[name][0] / r["anchor"][0]

    print(f"lock+release, {args.clients} concurrent clients, {args.seconds:g} s measured per "
          f"contender, {args.rounds} interleaved round(s); etcd data on "
          f"{'/dev/shm' if args.shm else 'disk'}, redis appendfsync everysec")
    median = sorted(results, key=lambda r: ratio(r, "etcd"))[len(results) // 2]
    anchor = median["anchor"][0]
    print("median round (by the etcd store's ratio):")
    print(line("etcd Lock/Unlock API (anchor)", *median["anchor"]))
    for name in STORES:
        print(line(f"service, {name} store", *median[name], anchor=anchor))
    print("target: every store >= 1.00x the etcd lock API")
    print("context (where the time goes):")
    print(line("  EtcdStore API in-process, no HTTP", *median["alone"], anchor=anchor))
    print(line("  FastAPI ceiling: 2 trivial requests", *median["ceiling"], anchor=anchor))
    for name in STORES:
        print(f"  service, {name} store: {median[name][0] / median['ceiling'][0]:.2f}x the FastAPI ceiling")
    for i, r in enumerate(results, 1):
        print(f"round {i}: " + ", ".join(f"{name} {ratio(r, name):.2f}x" for name in STORES)
              + f" (anchor {r['anchor'][0]:.0f} pairs/s)")


if __name__ == "__main__":
    main()
