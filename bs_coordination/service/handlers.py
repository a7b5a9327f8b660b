"""Turn exceptions into answers, in one place.

Library code raises ``CoordinationError`` subclasses (each carries its ``status_code``); this
module maps them, and FastAPI's validation errors, to an ``ErrorResponse`` body. Validation
messages start with the field they are about (``"timeout: Input should be greater than 0"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bs_coordination.errors import (
    CoordinationError,
    InvalidRequestError,
    LockConflictError,
    StoreUnavailableError,
)
from bs_coordination.models import DEVICE_NAME_RULE, ErrorResponse
from bs_coordination.stores import EventGap

log = logging.getLogger(__name__)

#: Request parts that prefix a pydantic error location but are not field names.
_PARTS = ("body", "query", "path", "header", "cookie")


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in _PARTS:
        parts = parts[1:]
    # Drop model-level markers such as "function-after[...]" that name no field.
    parts = [p for p in parts if "[" not in p]
    return ".".join(parts)


def _describe(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    field = _field(err.get("loc", ()))
    if kind == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return f"body: malformed JSON ({reason})" if reason else "body: malformed JSON"
    if kind == "extra_forbidden":
        return f"{field}: unknown field (not permitted)"
    if kind == "missing" and not field:
        return "body: a JSON object is required"
    if kind in ("string_pattern_mismatch", "string_too_long", "string_too_short") \
            and field.split(".")[-1] in ("device_name", "device_names"):
        msg = DEVICE_NAME_RULE
    if kind == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not field:
        if kind == "value_error":
            return msg  # model-level rules say which field they are about themselves
        loc = err.get("loc") or ("body",)
        return f"{loc[0]}: {msg}"
    return f"{field}: {msg}"


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """One line naming each field that is wrong."""
    return "; ".join(_describe(e) for e in errors) or "invalid request"


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    body = ErrorResponse(message=message, **extra)
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"))


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    # ``input``/``ctx`` may hold what the client sent (a lock key among it): never echo it.
    detail = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in errors]
    return error_response(422, validation_message(errors), detail=jsonable_encoder(detail))


async def _on_http(request: Request, exc: Exception) -> Response:
    """FastAPI's "error parsing the body" (bytes that are not UTF-8, or nesting deeper than the
    parser goes) becomes the same 422 as any other malformed JSON. Every other Starlette error
    (404 no such route, 405) keeps FastAPI's ``{"detail": ...}``: clients tell "no such route"
    from our own 404 by that shape."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
        message = "body: malformed JSON (not UTF-8 text, or nested too deeply)"
        detail = [{"type": "json_invalid", "loc": ["body"], "msg": message}]
        return error_response(422, message, detail=detail)
    return await http_exception_handler(request, exc)


async def _on_coordination(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CoordinationError)
    if isinstance(exc, StoreUnavailableError):
        # Said once per outage and then counted (outage.py), not once per request.
        outage = getattr(request.app.state, "store_outage", None)
        if outage is not None:
            outage.failed(exc.message, refused=f"{request.method} {request.url.path}")
        else:
            log.warning("store unavailable during %s %s: %s", request.method,
                        request.url.path, exc.message)
    conflicts = exc.conflicts if isinstance(exc, LockConflictError) else []
    detail = None
    if isinstance(exc, InvalidRequestError):
        # Same shape as a schema error, so a client reads both the same way.
        loc = [exc.field] if exc.field else []
        detail = [{"type": "value_error", "loc": loc, "msg": exc.message}]
    if detail is None:  # e.g. UnknownDeviceError's suggestions
        detail = getattr(exc, "detail", None)
    return error_response(exc.status_code, exc.message, conflicts=conflicts, detail=detail)


async def _on_gap(request: Request, exc: Exception) -> JSONResponse:
    return error_response(
        410, f"since: {exc}; reload /api/locks/status and continue from its last_event_id")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers an endpoint can give (all ``ErrorResponse``)."""
    text = {
        403: "The device is locked under another key or (authentication on) by another "
             "principal, or the API key lacks the role.",
        404: "The key holds no lock (on that device).",
        409: "Refused: a holder of equal or higher priority has a device; "
             "`conflicts` lists the holders.",
        410: "`since` is older than the retained event log.",
        422: "Invalid request; `message` names the field.",
        503: "The lock store is unreachable; nothing was changed.",
    }
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback and re-raises after this; the client gets the same body
    # shape as for every other error, and no internals.
    return error_response(500, f"internal error ({type(exc).__name__}); see the service log")


def install_handlers(app: FastAPI) -> None:
    """Register the one mapping from exceptions to status codes."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(CoordinationError, _on_coordination)
    app.add_exception_handler(EventGap, _on_gap)
    app.add_exception_handler(Exception, _on_unexpected)
