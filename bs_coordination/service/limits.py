"""Input bounds that no request schema can express: the size of a request body.

Lock requests are a few hundred bytes; a body past ``max_body_bytes`` (64 KiB by default,
``--max-body-bytes``) is refused with 413 and a JSON ``ErrorResponse`` naming the limit, before
any of it is parsed. A declared ``Content-Length`` over the limit is refused at once; a chunked
body is counted as it arrives and refused when it passes the limit.

The other bounds live where they are checked: names, lists and numbers in ``models.py`` (422),
WebSocket messages in ``ws.py`` and the server's ``ws_max_size``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bs_coordination.models import ErrorResponse

from .config import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger(__name__)

#: A refused body is read and dropped up to this much, so that a client still sending it sees
#: the 413 instead of a connection reset; past it the connection is closed.
DRAIN_LIMIT_BYTES = 4 * 1024 * 1024


def too_large_message(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes"


class BodyTooLargeError(HTTPException):
    """A chunked body passed the limit while a route was reading it."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=too_large_message(limit))
        self.limit = limit


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware:
    """Refuse HTTP request bodies larger than ``limit`` bytes with 413."""

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            log.info("refused %s %s: body of %d bytes (limit %d)", scope.get("method"),
                     scope.get("path"), declared, self.limit)
            await _drain(receive, min(declared, DRAIN_LIMIT_BYTES))
            await _send_413(send, self.limit)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLargeError(self.limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLargeError:
            # Raised outside a route's exception handling (a route maps it itself, below).
            if started:
                raise
            await _send_413(send, self.limit)


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop up to ``budget`` bytes of the body (see ``DRAIN_LIMIT_BYTES``)."""
    got = 0
    while got < budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        got += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_413(send: Send, limit: int) -> None:
    body = ErrorResponse(message=too_large_message(limit)).model_dump_json().encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _on_too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLargeError)
    body = ErrorResponse(message=too_large_message(exc.limit))
    return JSONResponse(status_code=413, content=body.model_dump(mode="json"))


def install_limits(app: FastAPI, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Bound request bodies of ``app`` to ``max_body_bytes``."""
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    # FastAPI re-raises an HTTPException met while reading a body; this gives it our shape.
    app.add_exception_handler(BodyTooLargeError, _on_too_large)


__all__ = ["DEFAULT_MAX_BODY_BYTES", "BodyLimitMiddleware", "BodyTooLargeError", "install_limits"]
