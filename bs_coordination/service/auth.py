"""API keys, principals and roles: who may do what (DESIGN.md "Security").

Authentication is off by default. ``--api-keys FILE`` (or ``COORDINATION_API_KEYS``) turns it on
with a JSON or YAML file that holds only the SHA-256 of each key::

    {"api_keys": [{"principal": "alice", "roles": ["operator"], "key_sha256": "<64 hex>"}]}

``bs-coordination keys new --principal alice --role operator`` makes a key and prints the entry.

Clients send ``Authorization: ApiKey <key>``. The pieces:

- ``bs_coordination.apikeys``: the key file, ``Principal`` and ``Role``; ``KeyRing.find``
  hashes the presented key and compares in constant time.
- ``ApiKeyMiddleware``: every HTTP request and WebSocket handshake but the health probes must
  carry a known key (else 401, or a handshake refused before any frame); the principal goes
  into the ASGI scope. Being outside the routes, it also covers ``/openapi.json``, ``/docs``,
  ``/metrics`` and any route added later.
- Roles (403) are checked by the dependencies in ``deps.py`` and by the lock routes, which
  also record the key's principal as the lock's ``user_id`` and the event's ``actor``.

Roles: ``read`` (status, devices, events, WebSocket), ``operator`` (MANUAL_OPERATOR locks),
``queue`` (QUEUE_EXECUTING, QUEUE_QUEUED), ``admin`` (everything). Every key can read; ``admin``
includes every role. Releasing or renewing a lock needs its key and, with authentication on,
the principal that holds it or ``admin``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from bs_coordination.apikeys import KeyFileError, KeyRing, Principal, Role
from bs_coordination.errors import CoordinationError
from bs_coordination.models import ErrorResponse, LockType

log = logging.getLogger(__name__)

#: Paths that never need a key (probes of orchestrators and load balancers).
OPEN_PATHS = frozenset({"/api/health/live", "/api/health/ready"})
#: Name of the security scheme in the OpenAPI document.
SCHEME_NAME = "ApiKey"
#: The ``Authorization`` scheme word (compared case-insensitively, as RFC 9110 says).
AUTH_SCHEME = "ApiKey"
#: Where the middleware leaves the authenticated ``Principal`` in the ASGI scope.
PRINCIPAL_SCOPE_KEY = "bs_coordination.principal"

#: The role a lock of each type needs.
LOCK_ROLES: Mapping[LockType, Role] = {
    LockType.MAINTENANCE: Role.ADMIN,
    LockType.QUEUE_EXECUTING: Role.QUEUE,
    LockType.MANUAL_OPERATOR: Role.OPERATOR,
    LockType.QUEUE_QUEUED: Role.QUEUE,
}
#: Roles that may hold locks (and so release and renew their own).
LOCK_HOLDER_ROLES = (Role.OPERATOR, Role.QUEUE, Role.ADMIN)


class AuthenticationError(CoordinationError):
    """No API key, a malformed ``Authorization`` header, or a key the service does not know."""

    status_code = 401


class PermissionDeniedError(CoordinationError):
    """The key is valid but its principal lacks the role (or does not hold the lock)."""

    status_code = 403


def require(principal: Principal | None, *roles: Role, what: str) -> None:
    """Raise ``PermissionDeniedError`` unless ``principal`` has one of ``roles`` (``None``:
    authentication is off, everything is allowed)."""
    if principal is None or any(principal.can(r) for r in roles):
        return
    wanted = " or ".join(repr(r.value) for r in roles)
    raise PermissionDeniedError(
        f"{what} needs the {wanted} role; the API key of {principal.name!r} has: "
        f"{principal.describe_roles()}")


def require_lock_type(principal: Principal | None, lock_type: LockType) -> None:
    require(principal, LOCK_ROLES[lock_type], what=f"a {lock_type.value} lock")


def identify(keyring: KeyRing, authorization: str | None) -> Principal:
    """The principal of an ``Authorization`` header value, or ``AuthenticationError`` (whose
    message never repeats what was sent)."""
    if not authorization:
        raise AuthenticationError(
            f"an API key is required: send the header 'Authorization: {AUTH_SCHEME} <key>'")
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != AUTH_SCHEME.lower() or not key:
        raise AuthenticationError(f"malformed Authorization header: expected '{AUTH_SCHEME} <key>'")
    principal = keyring.find(key)
    if principal is None:
        raise AuthenticationError("unknown API key")
    return principal


# -- the middleware ---------------------------------------------------------------------------
def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


def _error_body(message: str) -> bytes:
    return ErrorResponse(message=message).model_dump_json().encode()


class ApiKeyMiddleware:
    """Refuse every HTTP request and WebSocket handshake without a known API key (401), except
    the health probes; put the ``Principal`` into the scope for the routes."""

    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or _route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            scope[PRINCIPAL_SCOPE_KEY] = identify(self.keyring, _header(scope, b"authorization"))
        except AuthenticationError as exc:
            # The path only (a query string may hold a lock key); never the header.
            log.info("refused %s %s: %s", scope.get("method", "WEBSOCKET"), _route_path(scope),
                     exc.message)
            if kind == "http":
                await _send_http(send, 401, exc.message)
            else:
                await _refuse_websocket(scope, receive, send, 401, exc.message)
            return
        await self.app(scope, receive, send)


_CHALLENGE = (b"www-authenticate", AUTH_SCHEME.encode())


async def _send_http(send: Send, status: int, message: str) -> None:
    body = _error_body(message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        _CHALLENGE]})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send, status: int,
                            message: str) -> None:
    """Answer the handshake with an HTTP error (the ASGI denial-response extension), or, where
    the server lacks it, close before accepting (the server then answers 403)."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = _error_body(message)
        await send({"type": "websocket.http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            _CHALLENGE]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


# -- OpenAPI ----------------------------------------------------------------------------------
def _security_scheme() -> dict[str, Any]:
    return {"type": "apiKey", "in": "header", "name": "Authorization",
            "description": f"`{AUTH_SCHEME} <key>`: a key from the service's `--api-keys` file."}


def describe_security(schema: dict[str, Any], auth_on: bool) -> dict[str, Any]:
    """Make the OpenAPI document say what the service enforces.

    Auth on: every operation but the health probes declares the key and its 401 answer (the
    middleware enforces exactly that, also on routes that declare no dependency). Auth off: no
    security at all. Idempotent.
    """
    components = schema.setdefault("components", {})
    schemes = components.setdefault("securitySchemes", {})
    has_error_model = "ErrorResponse" in components.get("schemas", {})
    unauthorized: dict[str, Any] = {"description": "No API key, or one the service does not know."}
    if has_error_model:
        unauthorized["content"] = {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or method not in (
                    "get", "put", "post", "delete", "patch", "head", "options", "trace"):
                continue
            if auth_on and path not in OPEN_PATHS:
                op["security"] = [{SCHEME_NAME: []}]
                op.setdefault("responses", {}).setdefault("401", unauthorized)
            else:
                op.pop("security", None)
    if auth_on:
        schemes[SCHEME_NAME] = _security_scheme()
    else:
        schemes.pop(SCHEME_NAME, None)
        if not schemes:
            components.pop("securitySchemes", None)
    return schema


def install_auth(app: FastAPI, api_keys: str | None) -> KeyRing | None:
    """Turn authentication on for ``app`` when ``api_keys`` names a key file (``KeyFileError``
    if it is unusable), and make its OpenAPI document say so either way."""
    keyring = KeyRing.from_file(api_keys) if api_keys else None
    app.state.keyring = keyring
    if keyring is not None:
        app.add_middleware(ApiKeyMiddleware, keyring=keyring)
        if keyring.principals:
            log.info("authentication on: %d API key(s)", len(keyring.principals))
        else:
            log.warning("authentication on, but %s lists no keys: every request but the health "
                        "probes gets 401 (make a key with 'bs-coordination keys new')", api_keys)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        return describe_security(build(), keyring is not None)

    app.openapi = openapi  # type: ignore[method-assign]
    return keyring


__all__ = [
    "LOCK_ROLES",
    "OPEN_PATHS",
    "ApiKeyMiddleware",
    "AuthenticationError",
    "KeyFileError",
    "KeyRing",
    "PermissionDeniedError",
    "Principal",
    "Role",
    "describe_security",
    "identify",
    "install_auth",
    "require",
    "require_lock_type",
]
