"""Exit codes of the command line, and how an error of the client library becomes one."""

from __future__ import annotations

from typing import Any

from bs_coordination.errors import (
    CoordinationError,
    InvalidRequestError,
    LockConflictError,
    LockNotFoundError,
    LockNotOwnedError,
    ServiceError,
    UnknownDeviceError,
)

EXIT_OK = 0
#: The service could not be reached, answered 5xx (e.g. its store is down), or anything else.
EXIT_ERROR = 1
#: The device is held by someone of equal or higher priority (HTTP 409).
EXIT_CONFLICT = 2
#: The key holds nothing (on that device), or no such device/route (HTTP 404).
EXIT_NOT_FOUND = 3
#: The device is locked under another key, or the API key lacks the role / is missing (403, 401).
EXIT_FORBIDDEN = 4
#: Bad command line, or a request the service refused as invalid (HTTP 4xx other than the above).
EXIT_USAGE = 64

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}   success
  {EXIT_ERROR}   error: the service is unreachable or failed (5xx, e.g. its store is down)
  {EXIT_CONFLICT}   conflict: the device is held by someone else (the holder is printed on stderr)
  {EXIT_NOT_FOUND}   not found: the key holds nothing there, or the service lacks the endpoint
  {EXIT_FORBIDDEN}   forbidden: locked under another key, or the API key is missing or lacks the role
  {EXIT_USAGE}  usage: bad arguments, or the service refused the request as invalid (422)
"""

_STATUS_EXIT = {409: EXIT_CONFLICT, 404: EXIT_NOT_FOUND, 403: EXIT_FORBIDDEN, 401: EXIT_FORBIDDEN}


class CliError(Exception):
    """Ends the command with ``code`` after printing ``message`` on stderr."""

    def __init__(self, message: str, code: int = EXIT_ERROR, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.body = body


def exit_code_for(status: int) -> int:
    """The exit code for an HTTP status (0: no answer came)."""
    if status in _STATUS_EXIT:
        return _STATUS_EXIT[status]
    if 400 <= status < 500:
        return EXIT_USAGE
    return EXIT_ERROR


def exit_code_of(exc: CoordinationError) -> int:
    """The exit code for an error raised by the client library."""
    if isinstance(exc, LockConflictError):
        return EXIT_CONFLICT
    if isinstance(exc, (LockNotFoundError, UnknownDeviceError)):
        return EXIT_NOT_FOUND
    if isinstance(exc, LockNotOwnedError):
        return EXIT_FORBIDDEN
    if isinstance(exc, InvalidRequestError):
        return EXIT_USAGE
    if isinstance(exc, ServiceError):
        return exit_code_for(exc.status_code)
    return EXIT_ERROR


def cli_error(exc: CoordinationError, what: str) -> CliError:
    """``exc`` (from the client library) as the command's error, its text the client's own.

    A ``ServiceError``'s message already names the operation (``status: HTTP 401: ...``,
    ``GET ...: cannot reach the coordination service (...)``); the others carry the service's
    message alone, so ``what`` (``release m1``) is put in front of it.
    """
    message = exc.message if isinstance(exc, ServiceError) else f"{what}: {exc.message}"
    return CliError(message, exit_code_of(exc), getattr(exc, "body", None))
