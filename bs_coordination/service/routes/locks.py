"""Lock operations: request, acknowledge a preemption, release, renew, force-release, and
status."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError

from bs_coordination.errors import InvalidRequestError
from bs_coordination.models import (
    DEVICE_NAME_PATTERN,
    MAX_NAME_LENGTH,
    AckRequest,
    AckResponse,
    ForceReleaseRequest,
    ForceReleaseResponse,
    LockRequest,
    LockResponse,
    LocksStatusResponse,
    LockStatus,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
    RenewResponse,
)

from ..auth import LOCK_HOLDER_ROLES, Principal, Role, require, require_lock_type
from ..deps import caller
from ..handlers import error_responses
from ..status import locks_status

log = logging.getLogger(__name__)

# Every route reads its caller with ``deps.caller(request)`` (a valid key when authentication
# is on; ``auth.describe_security`` declares it in OpenAPI). The body is the one parameter
# FastAPI parses: each further declared parameter costs the hot path more than the lock
# operation itself, so the two other inputs (the Idempotency-Key header, the deprecated query
# form of a release) are read here, validated by pydantic, refused with the same 422 FastAPI
# gives, and declared in OpenAPI by ``openapi_extra``.
router = APIRouter(prefix="/api", tags=["locks"])


def _invalid(exc: ValidationError, *where: str) -> RequestValidationError:
    """FastAPI's 422 for a parameter read by hand: pydantic's errors, located at ``where``."""
    return RequestValidationError([{**e, "loc": (*where, *e["loc"])} for e in exc.errors()])


def _parameter(where: str, name: str, schema: dict[str, Any], description: str, *,
               title: str, deprecated: bool = False) -> dict[str, Any]:
    """An optional OpenAPI parameter, as FastAPI would declare it."""
    extra = {"deprecated": True} if deprecated else {}
    return {"name": name, "in": where, "required": False, "description": description, **extra,
            "schema": {"anyOf": [schema, {"type": "null"}], "title": title,
                       "description": description, **extra}}


#: The Idempotency-Key header: the client's random secret naming one lock request.
IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = TypeAdapter(
    Annotated[str, StringConstraints(min_length=16, max_length=255, pattern=r"^[!-~]+$")])
_IDEMPOTENCY_PARAMETER = _parameter(
    "header", IDEMPOTENCY_HEADER, _IDEMPOTENCY_KEY.json_schema(), title=IDEMPOTENCY_HEADER,
    description="A random secret (16 to 255 visible ASCII characters, e.g. 32 random "
                "base64url characters) naming this lock request. Sent again with the same "
                "body (after a lost answer), the request gets the same grant (same lock_key, "
                "same token) while that grant lasts, instead of a conflict or a second lock; "
                "with another body it is refused (422). Keep it as secret as the lock key: "
                "the key is derived from it.")


def _idempotency_key(request: Request) -> str | None:
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return None
    try:
        return _IDEMPOTENCY_KEY.validate_python(value)
    except ValidationError as exc:
        raise _invalid(exc, "header", IDEMPOTENCY_HEADER) from None


def _owner(principal: Principal | None) -> str | None:
    """Who must hold the locks a key touches: the caller, unless an admin or auth is off."""
    return None if principal is None or principal.is_admin else principal.name


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


@router.post(
    "/lock/request",
    response_model=LockResponse,
    responses=error_responses(403, 404, 409, 422, 503),
    summary="Lock one device or several at once (all or none)",
    openapi_extra={"parameters": [_IDEMPOTENCY_PARAMETER]},
)
async def request_lock(req: LockRequest, request: Request) -> LockResponse:
    """Grant the devices under one key, preempting lower-priority holders, or answer 409 with
    the holders in the way. With ``wait`` the request queues for up to that many seconds.
    Presenting ``lock_key`` upgrades that key's locks or adds devices under it (404 if the key
    holds nothing). With authentication on, ``user_id`` is the API key's principal whatever
    the body says, and the lock type needs its role (403).

    Preemption handshake: when the grant displaces holders that asked for it
    (``acknowledge_preemption``), they are told at once (their ``preempted`` event) and this
    answer waits until each acknowledged (``POST /api/lock/ack``) or the service's deadline
    (``--preempt-ack-timeout``) passed: ``acknowledged`` says which came first.

    ``Idempotency-Key``: sent again after a lost answer, the request gets the same grant."""
    idempotency_key = _idempotency_key(request)
    c = caller(request)
    store, devices, principal = c.store, c.devices, c.principal
    if principal is not None:
        require_lock_type(principal, req.lock_type)
        req = req.model_copy(update={"user_id": principal.name})
    devices.check_lock_names(req.names)  # --strict-devices: 404 for unknown names
    grant = await store.request(req, actor=req.user_id, owner=_owner(principal),
                                idempotency_key=idempotency_key)
    locks = grant.locks
    tokens = [lk.token for lk in locks]
    expiries = [lk.expires_at for lk in locks if lk.expires_at is not None]
    if log.isEnabledFor(logging.INFO):  # the hot path: no formatting for a disabled line
        log.info("granted %s to %r (%s)", _names(req.names), req.user_id, req.lock_type.value)
    message = f"Lock granted on {_names(req.names)} ({req.lock_type.value})"
    if grant.preempted:
        displaced = _names(sorted({lk.device_name for lk in grant.preempted}))
        message += (f"; the holders of {displaced} acknowledged the preemption"
                    if grant.acknowledged else
                    f"; not every holder of {displaced} acknowledged the preemption in time")
    return LockResponse(
        success=True,
        lock_key=grant.lock_key,
        message=message,
        expires_at=min(expiries) if expiries and len(expiries) == len(locks) else None,
        token=max(tokens) if tokens else None,
        locks=locks,
        acknowledged=grant.acknowledged,
        preempted=grant.preempted,
    )


@router.post(
    "/lock/ack",
    response_model=AckResponse,
    responses=error_responses(403, 404, 422, 503),
    summary="Acknowledge a preemption: the holder stopped using the device",
)
async def acknowledge_preemption(req: AckRequest, request: Request) -> AckResponse:
    """The holder of a preempted lock (taken with ``acknowledge_preemption``) says it stopped
    using ``device_name`` (or every preempted device of ``lock_key`` when absent): the
    preemptor's request, which waits for this, is answered with ``acknowledged: true``. An
    acknowledgement after the deadline is recorded (``acknowledged_at``) but changes no answer.
    ``acknowledged`` lists the locks acknowledged (empty: nothing was waiting for one).
    403 if the device is locked under another key, 404 if the key holds nothing there."""
    c = caller(request)
    store, principal = c.store, c.principal
    require(principal, *LOCK_HOLDER_ROLES, what="acknowledging a preemption")
    actor = None if principal is None else principal.name
    done = await store.acknowledge(req.lock_key, req.device_name, actor=actor,
                                   owner=_owner(principal))
    if done:
        message = f"Acknowledged the preemption of {_names([lk.device_name for lk in done])}"
    else:
        message = "Nothing waits for an acknowledgement under this key"
    return AckResponse(success=True, message=message, acknowledged=done)


#: The original service's query form of a release: deprecated, read by hand (see above).
_LEGACY_RELEASE = {
    "device_name": "Deprecated query form of `device_name`.",
    "lock_key": "Deprecated: send the key in the JSON body (query strings get logged by proxies).",
    "user_id": "Deprecated query form of `user_id`.",
}


def _field_schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The JSON schema of one field of ``model``, without its ``null`` branch and its texts."""
    schema = model.model_json_schema()["properties"][name]
    schema = next(s for s in schema.get("anyOf", [schema]) if s.get("type") != "null")
    return {k: v for k, v in schema.items() if k not in ("title", "description")}


_LEGACY_RELEASE_PARAMETERS = [
    _parameter("query", name, _field_schema(ReleaseRequest, name), description,
               title=name.replace("_", " ").title(), deprecated=True)
    for name, description in _LEGACY_RELEASE.items()]


def _legacy_release(request: Request) -> ReleaseRequest:
    """A release sent in the query string (``?device_name=&lock_key=&user_id=``)."""
    query = {k: request.query_params[k] for k in _LEGACY_RELEASE if k in request.query_params}
    if "lock_key" not in query:
        raise InvalidRequestError(
            "lock_key: missing; send {\"lock_key\": ..., \"device_name\": ...} as JSON",
            field="lock_key")
    try:
        return ReleaseRequest.model_validate(query)
    except ValidationError as exc:
        raise _invalid(exc, "query") from None


@router.post(
    "/lock/release",
    response_model=ReleaseResponse,
    responses=error_responses(403, 404, 422, 503),
    summary="Release a device (or every device of a key)",
    openapi_extra={"parameters": _LEGACY_RELEASE_PARAMETERS},
)
async def release_lock(
    request: Request, body: Annotated[ReleaseRequest | None, Body()] = None,
) -> ReleaseResponse:
    """Release ``device_name`` under ``lock_key``, or every device of the key when no device is
    named. The original service's query form (``?device_name=&lock_key=&user_id=``) still
    works; the JSON body wins when both are given. With authentication on, only the principal
    holding the lock (or an admin) may release it, and the event names the key's principal."""
    c = caller(request)
    store, principal = c.store, c.principal
    require(principal, *LOCK_HOLDER_ROLES, what="releasing or renewing a lock")
    if body is None:
        body = _legacy_release(request)
    actor = body.user_id if principal is None else principal.name
    released = await store.release(body.lock_key, body.device_name, actor=actor,
                                   owner=_owner(principal))
    names = [lk.device_name for lk in released]
    return ReleaseResponse(success=True, message=f"Released {_names(names)}", released=released)


@router.post(
    "/lock/renew",
    response_model=RenewResponse,
    responses=error_responses(403, 404, 422, 503),
    summary="Set every lock of a key to end `timeout` seconds from now",
)
async def renew_lock(req: RenewRequest, request: Request) -> RenewResponse:
    """Set every lock of ``lock_key`` to expire ``timeout`` seconds from now (``null``: no
    expiry, people's locks only). This replaces the lease, whatever was left of it: a
    ``timeout`` shorter than the time left shortens it. With authentication on, only the principal holding the locks
    (or an admin) may renew them."""
    c = caller(request)
    store, principal = c.store, c.principal
    require(principal, *LOCK_HOLDER_ROLES, what="releasing or renewing a lock")
    actor = None if principal is None else principal.name
    locks = await store.renew(req.lock_key, req.timeout, actor=actor, owner=_owner(principal))
    expiries = [lk.expires_at for lk in locks if lk.expires_at is not None]
    return RenewResponse(
        success=True,
        message=f"Renewed {_names([lk.device_name for lk in locks])}",
        expires_at=min(expiries) if expiries else None,
        locks=locks,
    )


@router.post(
    "/lock/force-release",
    response_model=ForceReleaseResponse,
    responses=error_responses(403, 404, 422, 503),
    summary="Remove every lock on exactly one device (admin)",
)
async def force_release(req: ForceReleaseRequest, request: Request) -> ForceReleaseResponse:
    """Remove every lock, active and preempted, on exactly ``device_name``; preempted locks
    on overlapping names are then restored as after a release. Needs the admin role. Each
    ``force_released`` event names who did it as its ``actor`` (the API key's principal, or
    ``user_id`` with authentication off)."""
    c = caller(request)
    store, principal = c.store, c.principal
    require(principal, Role.ADMIN, what="this operation")
    actor = req.user_id if principal is None else principal.name
    released = await store.force_release(req.device_name, actor=actor, reason=req.reason)
    log.warning("force-released %d lock(s) on %r, reason: %r (by %r)", len(released),
                req.device_name, req.reason, actor)
    return ForceReleaseResponse(
        success=True,
        message=f"Force-released {len(released)} lock(s) on {req.device_name!r}",
        released=released,
    )


@router.get(
    "/locks/status",
    response_model=LocksStatusResponse,
    responses=error_responses(503),
    summary="Every lock, active and preempted",
)
async def all_locks(request: Request) -> LocksStatusResponse:
    """Every live lock. ``last_event_id`` is the newest event the list includes: follow
    ``/api/events?since=`` or ``/ws?since=`` from it."""
    return await locks_status(caller(request).store)


@router.get(
    "/locks/device/{device_name}",
    response_model=LockStatus,
    responses=error_responses(422, 503),
    summary="Lock status of one device",
)
async def device_status(
    device_name: Annotated[
        str, Path(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DEVICE_NAME_PATTERN)],
    request: Request,
) -> LockStatus:
    """The active lock covering the device (its own or an ancestor's: ``det1`` covers
    ``det1.cam``), the preempted locks waiting under it, and locks held on its components."""
    c = caller(request)
    status = await c.store.device_status(device_name)
    status.device = c.devices.describe(device_name)
    return status
