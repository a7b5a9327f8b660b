"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from bs_coordination.errors import CoordinationError

from ..deps import SettingsDep, StoreDep
from .device_config import RegistryDep

router = APIRouter(prefix="/api/health", tags=["health"])


class Live(BaseModel):
    status: Literal["alive"] = "alive"


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    store: str
    reason: str | None = None


@router.get("/live", response_model=Live, summary="Liveness: the process answers")
async def live() -> Live:
    return Live()


@router.get(
    "/ready",
    response_model=Ready,
    response_model_exclude_none=True,
    responses={503: {"model": Ready, "description": "Not ready; `reason` says why."}},
    summary="Readiness: the lock store answers and the first device discovery has finished "
    "(with --strict-devices: a device list is loaded)",
)
async def ready(request: Request, store: StoreDep, devices: RegistryDep,
                settings: SettingsDep) -> Ready | JSONResponse:
    """503 within ``--ready-timeout`` seconds (default 2) when the store does not answer."""
    outage = getattr(request.app.state, "store_outage", None)
    reason: str | None
    try:
        await asyncio.wait_for(store.ping(), settings.ready_timeout)
    except asyncio.TimeoutError:
        reason = (f"lock store unavailable: no answer within {settings.ready_timeout:g} s "
                  "(--ready-timeout)")
    except CoordinationError as exc:
        reason = exc.message
    except Exception as exc:  # a probe answers, whatever went wrong
        reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = None
        if outage is not None:
            outage.recovered()
    if reason is not None:
        if outage is not None:
            outage.failed(reason)
        body = Ready(status="not ready", store=store.kind, reason=reason)
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    if not devices.ready:
        body = Ready(status="not ready", store=store.kind,
                     reason="device discovery of the profile collection is still running")
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    if (why := devices.strict_unavailable_reason()) is not None:
        body = Ready(status="not ready", store=store.kind, reason=why)
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    return Ready(status="ready", store=store.kind)
