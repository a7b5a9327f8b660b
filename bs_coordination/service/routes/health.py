"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from bs_coordination.errors import CoordinationError

from ..deps import StoreDep
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
async def ready(store: StoreDep, devices: RegistryDep) -> Ready | JSONResponse:
    try:
        await store.ping()
    except CoordinationError as exc:
        body = Ready(status="not ready", store=store.kind, reason=exc.message)
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    except Exception as exc:  # a probe answers, whatever went wrong
        body = Ready(status="not ready", store=store.kind, reason=f"{type(exc).__name__}: {exc}")
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    if not devices.ready:
        body = Ready(status="not ready", store=store.kind,
                     reason="device discovery of the profile collection is still running")
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    if (why := devices.strict_unavailable_reason()) is not None:
        body = Ready(status="not ready", store=store.kind, reason=why)
        return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))
    return Ready(status="ready", store=store.kind)
