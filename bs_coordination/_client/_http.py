"""HTTP transport of the client: one aiohttp session, JSON in and out, errors mapped to
``bs_coordination.errors``.

The service answers every 4xx/5xx with ``{"success": false, "message": ..., "conflicts": [...]}``
(``ErrorResponse``); FastAPI's own validation answer (``{"detail": [...]}``) and plain-text
answers from proxies are understood too, so the message a user sees always says what went wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from bs_coordination.errors import (
    CoordinationError,
    InvalidRequestError,
    LockNotFoundError,
    LockNotOwnedError,
    ServiceError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)

#: ``ServiceError.status_code`` when no HTTP answer came at all (refused, reset, timed out).
NO_ANSWER = 0


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header the service expects for ``api_key`` (none without a key)."""
    return {"Authorization": f"ApiKey {api_key}"} if api_key else {}


def message_of(status: int, body: Any) -> str:
    """The human message of an error answer, whatever its shape."""
    if isinstance(body, dict):
        if isinstance(body.get("message"), str) and body["message"]:
            return body["message"]
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            # FastAPI's validation errors: name each field and what is wrong with it.
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query")]
                    where = ".".join(loc)
                    parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg")))
                else:
                    parts.append(str(item))
            if parts:
                return "; ".join(parts)
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return f"HTTP {status}"


def error_for(status: int, body: Any, what: str) -> CoordinationError:
    """The exception for an unexpected answer ``status`` to the operation ``what``."""
    message = message_of(status, body)
    if status == 403:
        return LockNotOwnedError(message)
    if status == 404:
        return LockNotFoundError(message)
    if status == 422:
        field = None
        if isinstance(body, dict) and isinstance(body.get("detail"), list) and body["detail"]:
            first = body["detail"][0]
            if isinstance(first, dict):
                loc = [str(p) for p in first.get("loc", []) if p not in ("body", "query")]
                field = ".".join(loc) or None
        return InvalidRequestError(message, field=field)
    if status == 503:
        return StoreUnavailableError(message)
    return ServiceError(f"{what}: HTTP {status}: {message}", status_code=status, body=body)


class HttpTransport:
    """One aiohttp session to the service; ``request`` returns ``(status, parsed body)``."""

    def __init__(self, base_url: str, timeout: float, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = auth_headers(api_key)
        self.session: aiohttp.ClientSession | None = None

    @property
    def is_open(self) -> bool:
        return self.session is not None and not self.session.closed

    def open(self) -> aiohttp.ClientSession:
        """The session, created on first use (inside the running event loop)."""
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self.session

    async def close(self) -> None:
        if self.session is not None and not self.session.closed:
            await self.session.close()
        self.session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        extra_time: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send one request; ``ServiceError`` (status 0) when no answer comes.

        ``extra_time`` lengthens the deadline, for requests the service may hold (``wait``).
        """
        session = self.open()
        url = self.base_url + path
        timeout = aiohttp.ClientTimeout(total=self.timeout + extra_time)
        try:
            async with session.request(method, url, json=json_body, params=params,
                                       timeout=timeout, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except asyncio.TimeoutError as exc:
            raise ServiceError(
                f"{method} {url}: no answer within {self.timeout + extra_time:g} s",
                status_code=NO_ANSWER) from exc
        except aiohttp.ClientError as exc:
            raise ServiceError(
                f"{method} {url}: cannot reach the coordination service ({exc})",
                status_code=NO_ANSWER) from exc
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = text
        return status, body
