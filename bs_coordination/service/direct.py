"""The lock operations' fast path: ``DirectRoutes`` answers their ordinary requests itself.

A lock request and its release are the service's hot path. Through FastAPI each one pays for
a dozen layers (error, telemetry and body-limit middleware, our metrics, body-limit and key
middleware, exception and exit-stack layers, routing through the included routers, generic
parameter solving, response validation) several times what the lock operation itself costs.
The routes stay ordinary FastAPI routes: they make the OpenAPI document and serve every
unusual request. ``DirectRoutes``, the outermost layer of the app, answers the ordinary ones:

- ``POST`` to one of ``routes``, no query string, ``Content-Type: application/json``, a
  ``Content-Length`` within ``--max-body-bytes``, no ``Origin`` header when CORS is on;
- with authentication on, a valid ``Authorization`` header;
- a body that parses as JSON and validates against the route's body model.

For those it calls the route's own endpoint function with the body and the ``Caller`` (what
``CallerDep`` gives the route), answers with the endpoint's result serialized as the route's
response model, maps an error the endpoint raises through the app's exception handlers (as for
any route), and records the request in the metrics. Every other request, including a body
that does not parse or validate and a key that is refused, continues into the FastAPI app
with its body replayed, so those answers (the 422 naming the field, the 401, the 413, the
deprecated query form of release) come from the one place that gives them everywhere else.

FastAPI's own OpenTelemetry instrumentation, when one is configured, sees only the requests
that go through FastAPI; ``/metrics`` counts every request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import PRINCIPAL_SCOPE_KEY, AuthenticationError, identify
from .deps import Caller

log = logging.getLogger(__name__)

_JSON = (b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8")


@dataclass(frozen=True)
class Direct:
    """One route answered directly: ``endpoint(**{body_arg: body, "caller": caller})``."""

    path: str
    body_model: type[BaseModel]
    endpoint: Callable[..., Awaitable[BaseModel]]
    body_arg: str


class DirectRoutes:
    """ASGI middleware answering the ordinary requests of ``routes`` (see the module doc).
    ``owner`` is the FastAPI app: its state (store, settings, keys, metrics) and handlers."""

    def __init__(self, app: ASGIApp, owner: Any, routes: Sequence[Direct]) -> None:
        self.app = app
        self.owner = owner
        self.routes = {r.path: r for r in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        route = self.routes.get(_route_path(scope)) if scope["type"] == "http" else None
        state = self.owner.state
        if route is None or scope["method"] != "POST" or scope["query_string"] \
                or getattr(state, "store", None) is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # names are lower case (ASGI)
        settings = state.settings
        length = headers.get(b"content-length", b"")
        if headers.get(b"content-type", b"").lower() not in _JSON or not length.isdigit() \
                or int(length) > settings.max_body_bytes \
                or (settings.cors_origins and b"origin" in headers):
            await self.app(scope, receive, send)
            return
        raw, complete = await _read_body(receive)
        if not complete:  # the client went away
            return
        try:
            # Parsed and validated in one step (pydantic's JSON mode). Where it and FastAPI's
            # ``json.loads`` + validation could differ (a byte-order mark, say), it refuses and
            # FastAPI decides.
            body = route.body_model.model_validate_json(raw)
        except ValidationError:  # not JSON, or invalid: FastAPI words the 422
            await self.app(scope, _replay(raw, receive), send)
            return
        principal = None
        keyring = state.keyring
        if keyring is not None:
            authorization = headers.get(b"authorization")
            try:
                principal = identify(keyring, authorization and authorization.decode("latin-1"))
            except AuthenticationError:  # the key middleware answers 401 and logs it
                await self.app(scope, _replay(raw, receive), send)
                return
            scope[PRINCIPAL_SCOPE_KEY] = principal
        status = await self._answer(route, body, Caller(state.store, state.devices, principal),
                                    scope, receive, send)
        metrics = getattr(state, "metrics", None)
        if metrics is not None:
            metrics.observe("POST", route.path, status, time.perf_counter() - start)

    async def _answer(self, route: Direct, body: BaseModel, caller: Caller, scope: Scope,
                      receive: Receive, send: Send) -> int:
        try:
            result = await route.endpoint(**{route.body_arg: body, "caller": caller})
        except Exception as exc:
            # The app's handler for the class or its nearest base, as Starlette looks them up.
            handlers = self.owner.exception_handlers
            cls = next((c for c in type(exc).__mro__ if c in handlers), Exception)
            if cls is Exception:  # not ours: logged as the server error middleware would
                log.exception("error answering POST %s", route.path)
            response = await handlers.get(cls, _bare_500)(Request(scope, receive, send), exc)
            await response(scope, receive, send)
            return int(response.status_code)
        payload = result.__pydantic_serializer__.to_json(result, by_alias=True)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload))]})
        await send({"type": "http.response.body", "body": payload})
        return 200


async def _bare_500(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("Internal Server Error", status_code=500)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and ``False`` if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(raw: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``raw`` as the whole body, then defers to ``receive``."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay
