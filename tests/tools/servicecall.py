"""A blocking JSON call to the service, for tests that run beside sync ophyd code."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def call(url: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """GET ``path`` (or POST ``body`` as JSON); returns (status, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
