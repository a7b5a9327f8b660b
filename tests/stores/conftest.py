"""Store fixtures: ``store`` is each store in turn (memory, then a private Redis, then etcd), and
``make_store()`` opens more stores on the same backend (a second replica on one Redis or etcd)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bs_coordination.stores import MemoryStore, Store, open_store

#: How long a test waits for something that should happen promptly.
PROMPTLY = 10.0


@pytest.fixture(params=["memory", "redis", "etcd"])
def backend(request: pytest.FixtureRequest) -> str:
    """``"memory"``, the URL of a fresh private redis-server, or an etcd URL with a key prefix
    of this test's own (on the session's private etcd)."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_server").url)
    if request.param == "etcd":
        return str(request.getfixturevalue("etcd_url"))
    return "memory"


@pytest.fixture
async def make_store(backend: str) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Open a store on ``backend``; with Redis or etcd, every call is another replica on the
    same server (with memory, the same store again: one process has one table)."""
    opened: list[Store] = []
    memory = MemoryStore() if backend == "memory" else None

    async def make() -> Store:
        store: Store = memory if memory is not None else open_store(backend)
        if store not in opened:
            await store.start()
            opened.append(store)
        return store

    yield make
    for s in opened:
        await s.close()


@pytest.fixture
async def store(make_store: Callable[[], Awaitable[Store]]) -> Store:
    return await make_store()


Eventually = Callable[..., Awaitable[None]]


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = PROMPTLY) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def eventually() -> Eventually:
    """``await eventually(check)``: poll the async ``check`` until true (fail after a while)."""
    return _eventually
