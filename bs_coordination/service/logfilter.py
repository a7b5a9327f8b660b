"""Keep query strings out of uvicorn's access and WebSocket log lines.

The deprecated release form carries the lock key in the query string, so a path logged with
its query would leak the key. The filter sits on the loggers (not on handlers), so it survives
uvicorn's own logging configuration.
"""

from __future__ import annotations

import logging

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


def install_query_filter() -> None:
    """Add the filter to uvicorn's loggers once (idempotent)."""
    for name in PATH_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QueryStringFilter) for f in logger.filters):
            logger.addFilter(QueryStringFilter())
