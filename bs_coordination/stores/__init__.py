"""Where the lock table lives: ``memory`` (default, one process) or ``redis://`` (persistent,
shared by replicas; ``redis+sentinel://`` follows a Sentinel-managed primary) or ``etcd://``
(Raft-replicated, no lost lock across a failover). All run the same ``locktable`` code."""

from __future__ import annotations

from typing import Any

from bs_coordination.stores.base import Clock, EventGap, Grant, ManualClock, Store, SystemClock
from bs_coordination.stores.memory import MemoryStore


def open_store(url: str = "memory", clock: Clock | None = None, *,
               timeout: float | None = None) -> Store:
    """Make the store named by ``url``: ``memory``, ``redis://host:port/db`` or another form
    of ``stores.redis_url`` (``rediss://``, ``unix://``, ``redis+sentinel://``), or
    ``etcd://HOST:PORT[,HOST:PORT...][/KEY_PREFIX]`` (``stores.etcd``).

    ``timeout``: seconds to wait for a reply from Redis before an operation fails with
    ``StoreUnavailableError`` (the Redis store's default when ``None``; no effect on memory).
    Raises ``ValueError`` naming the problem for anything else.
    """
    if url in ("", "memory", "memory://"):
        return MemoryStore(clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
        from bs_coordination.stores.redis import RedisStore

        if timeout is None:
            return RedisStore(url)
        return RedisStore(url, socket_timeout=timeout, connect_timeout=min(1.0, timeout))
    if url.startswith("etcd://"):
        from bs_coordination.stores.etcd import EtcdStore

        return EtcdStore(url) if timeout is None else EtcdStore(url, timeout=timeout)
    raise ValueError(f"store: {url!r} is neither 'memory' nor a redis:// or etcd:// URL")


def __getattr__(name: str) -> Any:
    """``RedisStore`` and ``EtcdStore`` on first use: importing the package loads neither
    redis-py nor the etcd client."""
    if name == "RedisStore":
        from bs_coordination.stores.redis import RedisStore

        return RedisStore
    if name == "EtcdStore":
        from bs_coordination.stores.etcd import EtcdStore

        return EtcdStore
    raise AttributeError(f"module 'bs_coordination.stores' has no attribute {name!r}")


__all__ = ["Clock", "EtcdStore", "EventGap", "Grant", "ManualClock", "MemoryStore", "RedisStore", "Store",
           "SystemClock", "open_store"]
