"""``rediss://``: the store and the service on a redis-server that speaks TLS only, its
certificate signed by a CA made for the test and named in the URL (``?ssl_ca_certs=``, read
by redis-py). A server the store cannot verify, or a plain connection, fails closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis_ha import TlsServer, tls_redis

from bs_coordination.errors import StoreUnavailableError
from bs_coordination.models import LockRequest, LockType, LockUpdateMessage
from bs_coordination.stores.redis import RedisStore
from bs_coordination.stores.redis_keys import KeySpace

pytestmark = pytest.mark.redis


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsServer]:
    with tls_redis(tmp_path) as server:
        yield server


def ask(name: str, user: str = "alice") -> LockRequest:
    return LockRequest(device_name=name, lock_type=LockType.MANUAL_OPERATOR, user_id=user)


async def test_the_store_over_tls(tls: TlsServer) -> None:
    url = f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={tls.ca}"
    store = RedisStore(url)
    check = aioredis.Redis.from_url(url)
    received: list[LockUpdateMessage] = []

    async def follow() -> None:
        async for msg in store.tail("0"):
            received.append(msg)

    task = asyncio.create_task(follow())
    try:
        await store.start()
        grant = await store.request(ask("det1"))
        with pytest.raises(Exception, match="alice"):
            await store.request(ask("det1", "bob"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not received:
            assert loop.time() < deadline, "the tail saw nothing over TLS"
            await asyncio.sleep(0.02)
        assert received[0].device_name == "det1" and received[0].lock == grant.locks[0]
        assert [lock.user_id for lock in await store.all_locks()] == ["alice"]
        assert len(await store.release(grant.lock_key)) == 1
        assert await check.xlen(KeySpace().events) == 2  # acquired, released
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await check.aclose()
        await store.close()


@pytest.mark.parametrize("how", ["unverified certificate", "plain connection"])
async def test_a_connection_it_cannot_trust_fails_closed(tls: TlsServer, how: str) -> None:
    # Without ssl_ca_certs the system's CAs do not know the test CA.
    url = (f"rediss://127.0.0.1:{tls.port}/0" if how == "unverified certificate"
           else f"redis://127.0.0.1:{tls.port}/0")
    store = RedisStore(url, socket_timeout=1.0)
    try:
        with pytest.raises(StoreUnavailableError, match="lock store unavailable"):
            await store.request(ask("det1"))
    finally:
        await store.close()
    verified = RedisStore(f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={tls.ca}")
    try:
        assert await verified.all_locks() == []  # nothing was granted
    finally:
        await verified.close()


async def test_the_service_over_tls(tls: TlsServer, spawn_service) -> None:  # type: ignore[no-untyped-def]
    svc = spawn_service(f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={tls.ca}")
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        r = await http.post("/api/lock/request", json={
            "device_name": "det1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"})
        assert r.status_code == 200, r.text
        status = (await http.get("/api/locks/device/det1")).json()
        assert status["locked"] is True and status["lock"]["user_id"] == "alice"
