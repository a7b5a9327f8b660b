"""One exception hierarchy, shared by the client, the service and the RunEngine plugin.

::

    CoordinationError
    ├── LockConflictError        a device is held by someone of equal or higher priority (HTTP 409)
    ├── LockNotOwnedError        the device is locked under another key (HTTP 403)
    ├── LockNotFoundError        the key holds nothing (on that device) (HTTP 404)
    ├── InvalidRequestError      a request that breaks a rule beyond its schema (HTTP 422)
    ├── StoreUnavailableError    the store cannot be reached: nothing was granted (HTTP 503)
    ├── UnknownDeviceError       strict discovery: no such device; ``suggestions`` (HTTP 404)
    ├── DiscoveryError           the profile collection could not be loaded (HTTP 422)
    └── ServiceError             the service answered with an unexpected status (client side)

The service maps each class to its status code in one exception handler; library code never
raises ``HTTPException``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bs_coordination.models import DeviceLock


class CoordinationError(Exception):
    """Root of every error this package raises."""

    status_code: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LockConflictError(CoordinationError):
    """The request was refused: a holder of equal or higher priority has the device.

    ``conflicts`` holds the public records of the holders (who, type, reason, since, until).
    """

    status_code = 409

    def __init__(self, message: str, conflicts: list[DeviceLock] | None = None) -> None:
        super().__init__(message)
        self.conflicts: list[DeviceLock] = list(conflicts or [])

    @property
    def holder(self) -> DeviceLock | None:
        """The first holder in the way, if the service named one."""
        return self.conflicts[0] if self.conflicts else None


class LockNotOwnedError(CoordinationError):
    """The named device is locked under another key."""

    status_code = 403


class LockNotFoundError(CoordinationError):
    """The key holds no lock (on the named device)."""

    status_code = 404


class InvalidRequestError(CoordinationError):
    """A well-formed request that breaks a lock rule (e.g. a queue lock without a lease)."""

    status_code = 422

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class StoreUnavailableError(CoordinationError):
    """The lock store cannot be reached; the service fails closed."""

    status_code = 503


class UnknownDeviceError(CoordinationError):
    """No device of that name was discovered; ``suggestions`` holds the closest known names."""

    status_code = 404

    def __init__(self, message: str, device_name: str,
                 suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.device_name = device_name
        self.suggestions: list[str] = list(suggestions or [])
        self.detail: dict[str, Any] = {"device_name": device_name,
                                       "suggestions": self.suggestions}

    @classmethod
    def for_name(cls, name: str, suggestions: list[str]) -> UnknownDeviceError:
        hint = f"; did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
        return cls(f"unknown device {name!r}: the profile collection defines no such device"
                   f"{hint}", name, suggestions)

    @classmethod
    def for_names(cls, suggestions: dict[str, list[str]]) -> UnknownDeviceError:
        parts = [f"{n!r}" + (f" (did you mean {', '.join(map(repr, s))}?)" if s else "")
                 for n, s in suggestions.items()]
        first = next(iter(suggestions))
        err = cls(f"unknown devices: {', '.join(parts)}: the profile collection defines no such "
                  "devices", first, suggestions[first])
        err.detail = {"device_names": list(suggestions), "suggestions": suggestions}
        return err


class DiscoveryError(CoordinationError):
    """Device discovery failed (the last good device list is kept), or cannot run now."""

    status_code = 422

    def __init__(self, message: str, status_code: int | None = None,
                 detail: Any = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.detail = detail


class ServiceError(CoordinationError):
    """The service answered with a status the client did not expect."""

    def __init__(self, message: str, status_code: int = 500, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


__all__ = [
    "CoordinationError",
    "DiscoveryError",
    "InvalidRequestError",
    "LockConflictError",
    "LockNotFoundError",
    "LockNotOwnedError",
    "ServiceError",
    "StoreUnavailableError",
    "UnknownDeviceError",
]
