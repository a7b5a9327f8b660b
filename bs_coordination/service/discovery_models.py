"""What device discovery reports: the device tree (``DeviceInfo``), the list served by the
device-config API and the discovery's status, as pydantic models (the OpenAPI schemas)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class DiscoveryMode(str, Enum):
    """How the device list is obtained (see ``service.discovery``'s docstring)."""

    AUTO = "auto"
    YAML = "yaml"
    LOAD = "load"


class DiscoveryState(str, Enum):
    """``disabled``: no collection configured (any name is accepted); ``loading``: the first
    discovery runs; ``loaded``: a device list is served; ``failed``: no list could be loaded."""

    DISABLED = "disabled"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class DeviceType(str, Enum):
    """What kind of device it is, as the original service named the kinds."""

    MOTOR = "motor"
    DETECTOR = "detector"
    SIGNAL = "signal"
    FLYER = "flyer"
    DEVICE = "device"




class _Public(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DeviceCapabilities(_Public):
    """Bluesky protocols the device implements."""

    readable: bool
    movable: bool
    flyable: bool


class DeviceInfo(_Public):
    """One device or component, as discovered from the profile collection."""

    name: str = Field(description="Dotted name from the root device (`stage.coarse.x`).")
    device_class: str
    module: str
    device_type: DeviceType
    capabilities: DeviceCapabilities
    ophyd_name: str | None = Field(
        default=None, description="The object's own `.name` (may differ from `name`).")
    prefix: str | None = Field(default=None, description="EPICS prefix of the device.")
    read_pv: str | None = Field(default=None, description="EPICS PV the signal reads.")
    write_pv: str | None = Field(default=None, description="EPICS PV the signal writes.")
    components: list[DeviceInfo] = Field(default_factory=list)
    components_complete: bool = Field(
        default=True,
        description="False when components were not expanded (area detectors, depth limits): "
        "names below this one are then accepted without being listed.")


class DeviceListResponse(_Public):
    """Discovered devices (root devices, each with its components)."""

    devices: list[DeviceInfo]
    total_count: int
    source: str | None = None
    loaded_at: datetime | None = None


class DiscoveryStatus(_Public):
    """Where the device list came from, and how the last attempt went."""

    configured: bool = Field(description="A profile collection is configured.")
    state: DiscoveryState
    ready: bool = Field(description="The first discovery has finished (or none is configured).")
    path: str | None = None
    mode: DiscoveryMode
    strict: bool = Field(description="Lock requests for unknown devices are refused (404).")
    source: str | None = Field(default=None, description="What the served list was read from.")
    count: int = Field(description="Root devices in the served list.")
    component_count: int = Field(description="Names in the served list, components included.")
    loaded_at: datetime | None = None
    duration_s: float | None = Field(default=None, description="How long the last load took.")
    last_attempt_at: datetime | None = None
    last_error: str | None = Field(
        default=None, description="Why the last attempt failed (null after a success).")
    last_error_detail: str | None = Field(
        default=None, description="Traceback or output tail of the failed attempt.")
    warnings: list[str] = Field(default_factory=list)
    timeout_s: float


__all__ = [
    "DeviceCapabilities",
    "DeviceInfo",
    "DeviceListResponse",
    "DeviceType",
    "DiscoveryMode",
    "DiscoveryState",
    "DiscoveryStatus",
]
