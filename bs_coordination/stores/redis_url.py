"""Where the Redis store connects: a store URL read into redis-py clients.

Accepted forms:

- ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` (TLS; redis-py reads its
  query parameters, e.g. ``?ssl_ca_certs=/path/ca.pem&ssl_certfile=...&ssl_keyfile=...``),
  ``unix://[[USER]:PASSWORD@]/path/redis.sock[?db=N]``: read by redis-py's ``from_url``;
- ``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE_NAME[/DB]``: the Sentinels'
  addresses (port 26379 when left out) and the name of the service they monitor. The clients
  are redis-py's ``Sentinel(...).master_for(SERVICE_NAME)``: every new connection asks the
  Sentinels where the primary is, and a ``READONLY`` reply (a primary demoted by a failover)
  makes the connection drop and ask again, so the store follows failovers by itself. The
  password is the monitored servers' (Sentinels without one are assumed).

Options of this store, in the query string of any form (never passed to redis-py):

- ``wait_replicas=N``: after every commit, ``WAIT N`` replicas to acknowledge it before the
  operation is answered; fewer in time answers 503 (the outcome is unknown to the caller, as
  for a lost reply). Default 1 with Sentinel (a failover then loses no acknowledged change
  while a replica keeps up), 0 otherwise;
- ``wait_timeout=MS``: how long that ``WAIT`` may take (default 500 ms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as redis_async
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

SENTINEL_SCHEME = "redis+sentinel"
#: The URL schemes the Redis store accepts.
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_WAIT_TIMEOUT_MS = 500
_OPTIONS = ("wait_replicas", "wait_timeout")

#: Makes a client: keyword arguments of ``redis.asyncio.Redis`` (timeouts, retry...).
ClientFactory = Callable[..., redis_async.Redis]


@dataclass(frozen=True)
class Target:
    """A parsed store URL: ``client(**kwargs)`` opens a client (with its own pool)."""

    client: ClientFactory
    #: Where, for messages: addresses and names only, never a password.
    where: str
    password: str | None
    wait_replicas: int
    wait_timeout_ms: int


def _int_option(options: dict[str, str], name: str, default: int) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"store: {name}={raw[:20]!r} must be a whole number >= 0")
    return value


def parse(url: str) -> Target:
    """Read a store URL (``ValueError`` naming the problem, never showing a password)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"store: the scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = {k: v for k, v in query if k in _OPTIONS}
    rest = urlencode([(k, v) for k, v in query if k not in _OPTIONS])
    sentinel = scheme == SENTINEL_SCHEME
    wait = _int_option(options, "wait_replicas", 1 if sentinel else 0)
    wait_ms = _int_option(options, "wait_timeout", DEFAULT_WAIT_TIMEOUT_MS)
    if sentinel:
        return _sentinel(parts.netloc, parts.path, wait, wait_ms)
    plain = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment))
    if scheme == "unix":
        where = parts.path or "unix socket"
    else:
        where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"

    def client(**kwargs: Any) -> redis_async.Redis:
        return redis_async.Redis.from_url(plain, **kwargs)

    return Target(client, where, parts.password and unquote(parts.password), wait, wait_ms)


def _sentinel(netloc: str, path: str, wait: int, wait_ms: int) -> Target:
    userinfo, _, hosts = netloc.rpartition("@")
    password = (unquote(userinfo.partition(":")[2]) or None) if userinfo else None
    addresses: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, port = _address(item)
        addresses.append((host, port))
    segments = [unquote(s) for s in path.split("/") if s]
    if not 1 <= len(segments) <= 2:
        raise ValueError("store: a redis+sentinel:// URL names the service after the "
                         "addresses: redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE_NAME[/DB]")
    service = segments[0]
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"store: the database {segments[1][:20]!r} is not a number")
        db = int(segments[1])
    where = f"Sentinel {','.join(f'{h}:{p}' for h, p in addresses)} service {service!r}"

    def client(**kwargs: Any) -> redis_async.Redis:
        # The Sentinels answer quickly or not at all: short timeouts, one retry (redis-py 8
        # would retry ten times before asking the next Sentinel).
        timeouts = {k: v for k, v in kwargs.items()
                    if k in ("socket_connect_timeout",) and v is not None}
        sentinels = Sentinel(addresses, sentinel_kwargs={
            "socket_timeout": 1.0, "retry": Retry(NoBackoff(), 1), **timeouts})
        client: redis_async.Redis = sentinels.master_for(service, db=db, password=password,
                                                         **kwargs)
        return client

    return Target(client, where, password, wait, wait_ms)


async def close(client: redis_async.Redis) -> None:
    """Close ``client``, and with Sentinel its connections to the Sentinels too."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    await client.aclose()
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def _address(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"store: {item[:60]!r} is not a HOST:PORT address of a Sentinel")
    if port and not port.isdigit():
        raise ValueError(f"store: the port in {item[:60]!r} is not a number")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT
