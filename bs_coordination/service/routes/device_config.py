"""The original service's device-config API: devices discovered from the profile collection.

Plug in with ``app.include_router(device_config.router)`` and a ``DeviceRegistry`` in
``app.state.devices``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from starlette.requests import HTTPConnection

from bs_coordination.models import DEVICE_NAME_PATTERN, MAX_NAME_LENGTH, ErrorResponse

from ..deps import AdminDep, get_principal
from ..discovery import (
    DeviceInfo,
    DeviceListResponse,
    DeviceRegistry,
    DeviceType,
    DiscoveryStatus,
)

# Every route needs a valid key when authentication is on (and says so in OpenAPI).
router = APIRouter(prefix="/api/device-config", tags=["device-config"],
                   dependencies=[Depends(get_principal)])


async def get_registry(conn: HTTPConnection) -> DeviceRegistry:
    registry: DeviceRegistry = conn.app.state.devices
    return registry


RegistryDep = Annotated[DeviceRegistry, Depends(get_registry)]


def _errors(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": text} for c, text in codes.items()}


@router.get("/devices", response_model=DeviceListResponse,
            responses=_errors({422: "Not a device type."}), summary="Discovered devices")
async def list_devices(
    registry: RegistryDep,
    device_type: Annotated[DeviceType | None, Query(
        description="Only root devices of this type.")] = None,
) -> Response:
    """Every root device of the profile collection with its components (dotted names), type,
    capabilities and EPICS PV names where ophyd knows them. Empty when no collection is
    configured or none has loaded yet (see ``/api/device-config/status``)."""
    # Rendered once per device list: validating and serializing thousands of nodes on every
    # request would stall the lock requests sharing this event loop.
    return Response(registry.list_devices_json(device_type), media_type="application/json")


@router.get(
    "/devices/{name}",
    response_model=DeviceInfo,
    responses=_errors({
        404: "No such device; `detail.suggestions` lists the closest known names.",
        422: "Not a valid device name.",
    }),
    summary="One device or component",
)
async def get_device(
    registry: RegistryDep,
    name: Annotated[str, Path(min_length=1, max_length=MAX_NAME_LENGTH,
                              pattern=DEVICE_NAME_PATTERN,
                              description="Device or dotted component name (`stage.coarse.x`).")],
) -> DeviceInfo:
    """A device or a component (``stage.coarse.x``), with its components."""
    return registry.get_device(name)


@router.post(
    "/reload",
    response_model=DiscoveryStatus,
    responses=_errors({
        403: "The API key lacks the admin role (with authentication on).",
        409: "No profile collection is configured.",
        422: "Discovery failed; the last good device list is kept. `message` says why, "
             "`detail` is the discovery status.",
    }),
    summary="Discover the devices again",
)
async def reload_devices(registry: RegistryDep, admin: AdminDep) -> DiscoveryStatus:
    """Load the profile collection again (in a child process, within the time limit) and swap
    the new device list in at once. A failed reload changes nothing and answers 422 with the
    reason. A reload asked for while one runs waits for it. It runs the beamline's startup
    code: with authentication on, it needs the admin role."""
    return await registry.reload()


@router.get("/status", response_model=DiscoveryStatus, summary="Discovery status")
async def discovery_status(registry: RegistryDep) -> DiscoveryStatus:
    """Where the served list came from (``source``), how many devices it has (``count``), when
    it was loaded, and why the last attempt failed (``last_error``), if it did."""
    return registry.status()


@router.get(
    "/config/queueserver",
    response_class=Response,
    responses={
        200: {"description": "`existing_plans_and_devices.yaml` as the queue server writes it.",
              "content": {"application/x-yaml": {"schema": {"type": "string"}}}},
        404: {"model": ErrorResponse, "description": "No device list is loaded."},
    },
    summary="The device list for the queue server",
)
async def queueserver_config(registry: RegistryDep) -> Response:
    """The discovered devices (and plans, when the startup code was run) in the form of the
    queue server's ``existing_plans_and_devices.yaml``: save it under that name and the queue
    server loads it (``load_existing_plans_and_devices``)."""
    return Response(content=registry.queueserver_yaml(), media_type="application/x-yaml",
                    headers={"Content-Disposition":
                             'inline; filename="existing_plans_and_devices.yaml"'})
