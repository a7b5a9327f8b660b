"""etcd v3 through etcd's own gRPC gateway (its JSON API on the client port, ``/v3/...``),
over aiohttp, which the package already depends on.

Why the gateway and not a gRPC client library: the maintained asyncio client (``aetcd``)
connects to one endpoint only (a cluster's failover would be ours to write anyway), brings
``grpcio`` and ``protobuf`` for three calls, and has no stub for etcd's lock service, which the
benchmark drives as the anchor. The gateway is part of every etcd v3 server (``/v3/`` since
3.4), documented by etcd, and takes the same requests as gRPC, written as JSON (bytes in
base64, 64-bit numbers as strings); nothing of gRPC's wire protocol is written here.

``EtcdClient`` keeps a list of endpoints and uses one at a time. A request that could not
have been applied (no connection, or an error etcd answers before it proposes anything) is
sent to the next endpoint; one whose outcome is unknown (the connection dropped or the reply
timed out after the request was sent) raises ``EtcdUnavailable`` without a retry, so a write
is never applied twice. ``EtcdUnavailable`` names the endpoints (host:port), never more.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

#: gRPC status codes etcd answers only when it did not apply the request (the member has no
#: leader, is stopping, or refused before proposing): another endpoint may do better.
_NOT_APPLIED = {14}  # UNAVAILABLE
_NOT_APPLIED_TEXTS = ("no leader", "not capable", "server stopped", "too many requests")


#: A read that waited longer than its timeout (aiohttp >= 3.10 tells it from a connect timeout).
_READ_TIMEOUT: type[Exception] = getattr(aiohttp, "SocketTimeoutError", aiohttp.ServerTimeoutError)


class EtcdUnavailable(Exception):
    """No endpoint could serve the request (or its outcome is unknown)."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


class EtcdClient:
    """A small etcd v3 client: ``call(path, body)`` and ``watch(...)``.

    ``timeout``: seconds a reply is awaited at most; ``connect_timeout``: for connecting."""

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = 2.0,
                 connect_timeout: float = 0.5) -> None:
        self.endpoints = endpoints
        self.where = ",".join(f"{h}:{p}" for h, p in endpoints)
        self._current = 0
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), json_serialize=json.dumps)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, index: int, path: str) -> str:
        host, port = self.endpoints[index % len(self.endpoints)]
        return f"http://{host}:{port}/v3/{path}"

    async def call(self, path: str, body: dict[str, Any], *, idempotent: bool = False
                   ) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>``; the reply's JSON. Raises ``EtcdUnavailable``.

        ``idempotent`` (a read): sent to the next endpoint after any failure; otherwise only
        after one that shows the request was not applied."""
        problems: list[str] = []
        start = self._current
        for step in range(len(self.endpoints)):
            index = (start + step) % len(self.endpoints)
            try:
                async with self._http().post(self._url(index, path), json=body,
                                             timeout=self._timeout) as resp:
                    if resp.status == 404:  # not applied: no such API here
                        raise EtcdUnavailable(
                            f"etcd at {self._name(index)} has no /v3/{path} (etcd 3.4 or later, "
                            "with its gRPC gateway on the client port, is needed)")
                    reply: dict[str, Any] = await resp.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                what = "no reply in time" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
                if not idempotent and not isinstance(exc, aiohttp.ClientConnectorError):
                    # The request may have been applied: never send it again.
                    self._current = index + 1
                    raise EtcdUnavailable(f"etcd at {self._name(index)}: {what} "
                                          "(outcome unknown)") from None
                problems.append(f"{self._name(index)}: {what}")
                continue
            error = reply.get("error") if isinstance(reply, dict) else "not a JSON object"
            if error is None:
                self._current = index
                return reply
            code = reply.get("code")
            text = str(reply.get("message") or error)
            if idempotent or code in _NOT_APPLIED or any(t in text for t in _NOT_APPLIED_TEXTS):
                problems.append(f"{self._name(index)}: {text}")
                continue
            self._current = index + 1
            raise EtcdUnavailable(f"etcd at {self._name(index)}: {text}")
        raise EtcdUnavailable(f"etcd at {self.where}: " + "; ".join(problems))

    def _name(self, index: int) -> str:
        host, port = self.endpoints[index % len(self.endpoints)]
        return f"{host}:{port}"

    def _result(self, message: dict[str, Any], index: int) -> dict[str, Any]:
        if "error" in message:
            raise EtcdUnavailable(f"etcd at {self._name(index)}: watch: "
                                  f"{message.get('message') or message['error']}")
        result: dict[str, Any] = message.get("result", {})
        return result

    async def watch(self, key: str, range_end: str, start_revision: int,
                    idle: float = 30.0) -> AsyncIterator[dict[str, Any]]:
        """Each watch response (``result``) on ``[key, range_end)`` from ``start_revision``,
        until the stream ends or fails (``EtcdUnavailable``). The member must have a leader
        (``hasleader``), so a member cut off from the cluster ends the watch instead of
        going quiet. A stream silent for ``idle`` seconds ends quietly (the caller reads the log
        and watches again), which also ends a connection that died without a word."""
        body = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                                   "start_revision": str(start_revision)}}
        index = self._current
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout,
                                        sock_read=idle)
        try:
            async with self._http().post(self._url(index, "watch"), json=body, timeout=timeout,
                                         headers={"Grpc-Metadata-hasleader": "true"}) as resp:
                # Responses are JSON objects, one per line; a line may be long (a commit that
                # locked hundreds of devices), so lines are cut here, without a length limit.
                pending = b""
                async for chunk in resp.content.iter_any():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            result = self._result(json.loads(line), index)
                            yield result
                            if result.get("canceled"):
                                return
                return
        except _READ_TIMEOUT:
            return  # quiet for ``idle`` seconds: the caller reads the log and watches anew
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._current = index + 1  # try another member next time
            raise EtcdUnavailable(f"etcd at {self._name(index)}: watch: {type(exc).__name__}") from None


__all__ = ["EtcdClient", "EtcdUnavailable", "b64", "prefix_end", "unb64"]
