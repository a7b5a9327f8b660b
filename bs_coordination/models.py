"""Data models shared by the service, the client and the RunEngine plugin (pydantic v2).

Requests forbid unknown fields, so a typo is a clear 422 instead of a silently ignored
setting. Responses ignore unknown fields, so an older client keeps working against a newer
service. No public model carries a ``lock_key`` except the acquirer's ``LockResponse``.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum, IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

#: Longest accepted device name, user id, plan uid.
MAX_NAME_LENGTH = 200
#: Most devices one request may name.
MAX_DEVICES_PER_REQUEST = 200
#: Longest accepted reason text.
MAX_REASON_LENGTH = 1000
#: Longest lease (ten years): anything longer is a mistake, not a lease.
MAX_LEASE_SECONDS = 10 * 365 * 24 * 3600.0
#: Shortest lease: a shorter one could end before its grant reaches the holder (the service
#: answers in milliseconds; 100 ms still lets tests of expiry run quickly).
MIN_LEASE_SECONDS = 0.1
#: Longest a request may wait in the queue for a device.
MAX_WAIT_SECONDS = 3600.0
#: Default lease of a lock, in seconds.
DEFAULT_LEASE_SECONDS = 300.0

# Dotted names: ``det1``, ``det1.cam``, ``stage-coarse-x`` (ophyd-async), ``XF:31ID`` (PV-like).
DEVICE_NAME_PATTERN = r"^[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*$"
_DEVICE_NAME_RE = re.compile(DEVICE_NAME_PATTERN)
DEVICE_NAME_RULE = (
    f"a device name is 1 to {MAX_NAME_LENGTH} characters of letters, digits, '_', '-', ':', "
    "with '.' separating components (e.g. 'det1.cam')"
)


class LockType(str, Enum):
    """What a lock is for. The priority follows from the type (see ``LockPriority``)."""

    MAINTENANCE = "MAINTENANCE"
    QUEUE_EXECUTING = "QUEUE_EXECUTING"
    MANUAL_OPERATOR = "MANUAL_OPERATOR"
    QUEUE_QUEUED = "QUEUE_QUEUED"

    @property
    def priority(self) -> int:
        """Lower number = higher priority."""
        return int(LockPriority[self.value])

    @property
    def needs_lease(self) -> bool:
        """Programs (the queue) must hold a lease; people may lock without one."""
        return self in (LockType.QUEUE_EXECUTING, LockType.QUEUE_QUEUED)


class LockPriority(IntEnum):
    """Priority of each lock type (lower number = higher priority)."""

    MAINTENANCE = 0
    QUEUE_EXECUTING = 1
    MANUAL_OPERATOR = 2
    QUEUE_QUEUED = 3


class LockState(str, Enum):
    """``active``: the holder has the device; ``preempted``: waiting under a higher lock."""

    ACTIVE = "active"
    PREEMPTED = "preempted"


class PreemptionAck(str, Enum):
    """Where the preemption handshake of a displaced lock stands (its holder asked for it).

    ``pending``: the holder was told and the preemptor waits for its acknowledgement;
    ``acknowledged``: the holder confirmed in time that it stopped using the device;
    ``timed_out``: the deadline came first (a late acknowledgement still records its time).
    """

    PENDING = "pending"
    ACKNOWLEDGED = "acknowledged"
    TIMED_OUT = "timed_out"


class LockAction(str, Enum):
    """What happened to a lock (the ``action`` of a ``lock_update`` event)."""

    ACQUIRED = "acquired"
    RELEASED = "released"
    PREEMPTED = "preempted"
    RESTORED = "restored"
    EXPIRED = "expired"
    FORCE_RELEASED = "force_released"
    RENEWED = "renewed"
    UPGRADED = "upgraded"
    CONSUMED = "consumed"
    #: The holder of a preempted lock acknowledged that it stopped using the device.
    ACKNOWLEDGED = "acknowledged"
    #: The acknowledgement deadline of a preempted lock passed first.
    ACK_TIMEOUT = "ack_timeout"


def check_device_name(name: str) -> str:
    """Return ``name`` if it is a valid device name, else raise ``ValueError`` saying the rule."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"must not be empty: {DEVICE_NAME_RULE}")
    if len(name) > MAX_NAME_LENGTH or not _DEVICE_NAME_RE.match(name):
        raise ValueError(f"invalid device name {name[:40]!r}: {DEVICE_NAME_RULE}")
    return name


def names_overlap(a: str, b: str) -> bool:
    """True if one dotted name equals the other or is its ancestor (``det1`` / ``det1.cam``)."""
    if a == b:
        return True
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return long.startswith(short) and long[len(short)] == "."


class ConfinedModel(BaseModel):
    """A request model: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class PublicModel(BaseModel):
    """A response model: unknown fields are ignored (forward compatibility)."""

    model_config = ConfigDict(extra="ignore")


class LockHolder(PublicModel):
    """Who holds a device: the public part of a lock record."""

    device_name: str
    lock_type: LockType
    priority: int
    user_id: str
    reason: str | None = None
    plan_uid: str | None = None
    acquired_at: datetime
    expires_at: datetime | None = None


class DeviceLock(LockHolder):
    """A lock record as everyone but its acquirer sees it (it never carries the key)."""

    token: int = Field(description="Fencing token: only increases, service-wide.")
    state: LockState = LockState.ACTIVE
    preempted_by: LockHolder | None = Field(
        default=None, description="For a preempted lock: the holder that displaced it."
    )
    acknowledge_preemption: bool = Field(
        default=False, description="The holder acknowledges preemption (preemption handshake).")
    preemption_ack: PreemptionAck | None = Field(
        default=None, description="For a preempted lock whose holder asked for the handshake: "
        "pending, acknowledged or timed_out.")
    ack_deadline: datetime | None = Field(
        default=None, description="Until when the preemptor waits for the acknowledgement.")
    acknowledged_at: datetime | None = Field(
        default=None, description="When the holder acknowledged the preemption.")

    @property
    def is_active(self) -> bool:
        return self.state == LockState.ACTIVE


#: A device name in a request: the validators check it (and say the rule); the schema states it
#: too, so the OpenAPI document is truthful and a fuzzer makes names the service accepts.
DeviceName = Annotated[str, WithJsonSchema({
    "type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH, "pattern": DEVICE_NAME_PATTERN,
    "description": DEVICE_NAME_RULE})]
UserId = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
Reason = Annotated[str, Field(max_length=MAX_REASON_LENGTH)]
PlanUid = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
LockKey = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
# Strict: a number, never a text ("30") or a boolean (true would be a 1 s lease).
Lease = Annotated[float, Field(strict=True, ge=MIN_LEASE_SECONDS, le=MAX_LEASE_SECONDS,
                               description=f"Lease in seconds, {MIN_LEASE_SECONDS:g} to "
                               f"{MAX_LEASE_SECONDS:g}; the lock ends this long after it is "
                               "granted (or renewed).")]


class LockRequest(ConfinedModel):
    """Ask for one device (``device_name``) or several at once (``device_names``, all or none).

    ``timeout`` is the lease in seconds (``null``: no expiry, people's locks only); ``wait``
    queues the request for up to that many seconds when the device is taken; ``lock_key``
    presents an existing key to upgrade its lock or add devices under it.
    """

    # Exactly one of the two names the devices (null counts as absent).
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["device_name"], "properties": {"device_name": {"type": "string"}}},
        {"required": ["device_names"], "properties": {"device_names": {"type": "array"}}},
    ]})

    device_name: DeviceName | None = None
    device_names: list[DeviceName] | None = Field(default=None, min_length=1,
                                                  max_length=MAX_DEVICES_PER_REQUEST)
    lock_type: LockType
    user_id: UserId
    timeout: Lease | None = DEFAULT_LEASE_SECONDS
    reason: Reason | None = None
    plan_uid: PlanUid | None = None
    wait: float = Field(default=0.0, strict=True, ge=0, le=MAX_WAIT_SECONDS)
    lock_key: LockKey | None = None
    acknowledge_preemption: bool = Field(
        default=False, description="When a higher priority displaces this lock, the service "
        "tells the holder at once and answers the preemptor only after the holder called "
        "`POST /api/lock/ack` (or at the service's acknowledgement deadline).")

    @field_validator("device_name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        return None if v is None else check_device_name(v)

    @field_validator("device_names")
    @classmethod
    def _valid_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must name at least one device")
        return [check_device_name(n) for n in v]

    @model_validator(mode="after")
    def _rules(self) -> LockRequest:
        if (self.device_name is None) == (self.device_names is None):
            raise ValueError("give exactly one of device_name or device_names")
        names = self.names
        # Two names overlap when they are equal or one is an ancestor of the other: found
        # through a set (a request may name hundreds of devices), reported in request order.
        first: dict[str, int] = {}
        for i, n in enumerate(names):
            if n in first:
                raise ValueError(f"device_names: {n!r} and {n!r} overlap; name each device once")
            first[n] = i
        for i, n in enumerate(names):
            parts = n.split(".")
            for k in range(1, len(parts)):
                a = ".".join(parts[:k])
                if a in first:
                    x, y = (a, n) if first[a] < i else (n, a)
                    raise ValueError(
                        f"device_names: {x!r} and {y!r} overlap; name each device once")
        if self.timeout is None and self.lock_type.needs_lease:
            raise ValueError(
                f"timeout: a {self.lock_type.value} lock must have a lease (timeout > 0); "
                "only MAINTENANCE and MANUAL_OPERATOR locks may have none"
            )
        return self

    @property
    def names(self) -> list[str]:
        """The device names asked for, in request order."""
        if self.device_names is not None:
            return list(self.device_names)
        return [self.device_name] if self.device_name else []


class LockResponse(PublicModel):
    """Answer to a lock request. ``lock_key`` is only ever sent to the acquirer."""

    success: bool
    lock_key: str | None = None
    message: str
    expires_at: datetime | None = None
    token: int | None = None
    locks: list[DeviceLock] = Field(default_factory=list)
    conflicts: list[DeviceLock] = Field(default_factory=list)
    acknowledged: bool | None = Field(
        default=None, description="True when every holder this grant displaced that asked for "
        "the preemption handshake acknowledged in time (or none had to), false when the "
        "acknowledgement deadline came first.")
    preempted: list[DeviceLock] = Field(
        default_factory=list, description="The locks this grant displaced, as they stand when "
        "it is answered (their handshake state included).")


class AckRequest(ConfinedModel):
    """The holder of a preempted lock says it stopped using the device (``device_name``, or
    every preempted device of the key when absent)."""

    lock_key: LockKey
    device_name: DeviceName | None = None

    @field_validator("device_name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        return None if v is None else check_device_name(v)


class AckResponse(PublicModel):
    success: bool
    message: str
    acknowledged: list[DeviceLock] = Field(default_factory=list)


class ReleaseRequest(ConfinedModel):
    """Release ``device_name`` (or every device of the key when it is absent)."""

    lock_key: LockKey
    device_name: DeviceName | None = None
    user_id: UserId | None = None

    @field_validator("device_name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        return None if v is None else check_device_name(v)


class ReleaseResponse(PublicModel):
    success: bool
    message: str
    released: list[DeviceLock] = Field(default_factory=list)


class RenewRequest(ConfinedModel):
    """Set every lock of ``lock_key`` to end ``timeout`` seconds from now (this replaces the
    lease: a shorter ``timeout`` than the time left shortens it)."""

    lock_key: LockKey
    timeout: Lease | None = DEFAULT_LEASE_SECONDS


class RenewResponse(PublicModel):
    success: bool
    message: str
    expires_at: datetime | None = None
    locks: list[DeviceLock] = Field(default_factory=list)


class ForceReleaseRequest(ConfinedModel):
    """Remove every lock on exactly ``device_name`` (admin). ``user_id`` says who does it (the
    events' ``actor``); with authentication on, the API key's principal is the actor instead."""

    device_name: DeviceName
    reason: Reason | None = None
    user_id: UserId | None = None

    @field_validator("device_name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_device_name(v)


class ForceReleaseResponse(PublicModel):
    success: bool
    message: str
    released: list[DeviceLock] = Field(default_factory=list)


class LockStatus(PublicModel):
    """Status of one device: its active lock (its own or an ancestor's), what waits under it,
    and locks held on its components."""

    device_name: str
    locked: bool
    lock: DeviceLock | None = None
    preempted: list[DeviceLock] = Field(default_factory=list)
    component_locks: list[DeviceLock] = Field(default_factory=list)
    timestamp: datetime
    device: dict[str, Any] | None = Field(
        default=None, description="What discovery knows of the device (no component tree); "
        "null without a profile collection or for an unknown name.")


class LocksStatusResponse(PublicModel):
    """Every lock, active and preempted."""

    locks: list[DeviceLock]
    total_count: int
    timestamp: datetime
    last_event_id: str | None = None


class LockUpdateMessage(PublicModel):
    """One change, as sent on the WebSocket and kept in the event log."""

    type: Literal["lock_update"] = "lock_update"
    action: LockAction
    device_name: str
    lock: DeviceLock
    timestamp: datetime
    event_id: str | None = None
    actor: str | None = Field(default=None, description="Principal that caused the change.")
    reason: str | None = Field(
        default=None, description="Why the change was made, when its author said: a force "
        "release's reason (the holder's own reason is `lock.reason`).")


class EventsResponse(PublicModel):
    events: list[LockUpdateMessage]
    last_event_id: str | None = None


class ErrorResponse(PublicModel):
    """Body of every 4xx/5xx answer."""

    success: bool = False
    message: str
    conflicts: list[DeviceLock] = Field(default_factory=list)
    detail: Any = None


__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "MIN_LEASE_SECONDS",
    "AckRequest",
    "AckResponse",
    "DeviceLock",
    "ErrorResponse",
    "EventsResponse",
    "ForceReleaseRequest",
    "ForceReleaseResponse",
    "LockAction",
    "LockHolder",
    "LockPriority",
    "LockRequest",
    "LockResponse",
    "LockState",
    "LockStatus",
    "LockType",
    "LockUpdateMessage",
    "LocksStatusResponse",
    "PreemptionAck",
    "ReleaseRequest",
    "ReleaseResponse",
    "RenewRequest",
    "RenewResponse",
    "check_device_name",
    "names_overlap",
]
