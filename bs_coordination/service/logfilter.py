"""Keep secrets out of uvicorn's access and WebSocket log lines.

The deprecated release form carries the lock key in the query string, so a path logged with
its query would leak the key; and at DEBUG the WebSocket library logs every handshake header,
``Authorization: ApiKey <key>`` among them. The filters sit on the loggers (not on handlers),
so they survive uvicorn's own logging configuration.
"""

from __future__ import annotations

import logging
import re

#: Loggers whose records may carry a request path: HTTP access lines and WebSocket handshakes.
PATH_LOGGERS = ("uvicorn.access", "uvicorn.error")


def strip_query(value: object) -> object:
    if isinstance(value, str) and value.startswith("/") and "?" in value:
        return value.split("?", 1)[0]
    return value


class QueryStringFilter(logging.Filter):
    """Cut ``?...`` off every path argument of a log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(strip_query(a) for a in record.args)
        elif isinstance(record.msg, str) and "?" in record.msg and not record.args:
            record.msg = " ".join(str(strip_query(w)) for w in record.msg.split(" "))
        return True


#: Headers whose value is a credential.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_CREDENTIAL = re.compile(r"(?i)\b(ApiKey|Bearer|Basic)(\s+)[^\s'\",;]+")
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """``ApiKey abc`` -> ``ApiKey <redacted>`` (also Bearer and Basic credentials)."""
    return _CREDENTIAL.sub(rf"\1\2{REDACTED}", text) if " " in text else text


class SecretFilter(logging.Filter):
    """Redact credential headers (logged as ``"< %s: %s", name, value``) and any
    ``ApiKey <key>`` in a message or its arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            if len(args) >= 2 and isinstance(args[0], str) and args[0].lower() in SECRET_HEADERS:
                record.args = (args[0], REDACTED, *args[2:])
            else:
                record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_query_filter() -> None:
    """Add the filters to uvicorn's loggers once (idempotent)."""
    for name in PATH_LOGGERS:
        logger = logging.getLogger(name)
        for kind in (QueryStringFilter, SecretFilter):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
