"""One exception hierarchy, shared by the client, the service and the RunEngine plugin.

::

    CoordinationError
    ├── LockConflictError        a device is held by someone of equal or higher priority (HTTP 409)
    ├── LockNotOwnedError        the device is locked under another key (HTTP 403)
    ├── LockNotFoundError        the key holds nothing (on that device) (HTTP 404)
    ├── InvalidRequestError      a request that breaks a rule beyond its schema (HTTP 422)
    ├── StoreUnavailableError    the store cannot be reached: nothing was granted (HTTP 503)
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


class ServiceError(CoordinationError):
    """The service answered with a status the client did not expect."""

    def __init__(self, message: str, status_code: int = 500, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


__all__ = [
    "CoordinationError",
    "InvalidRequestError",
    "LockConflictError",
    "LockNotFoundError",
    "LockNotOwnedError",
    "ServiceError",
    "StoreUnavailableError",
]
