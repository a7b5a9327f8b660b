"""A lock service with authentication on, its keys, and clients that use them.

- ``keys``: principal -> API key for ``reader`` (read), ``alice`` and ``bob`` (operator),
  ``qs`` (queue), ``root`` (admin); ``key_file`` is the JSON file holding only their hashes.
- ``secure``: the service (memory store) started with ``api_keys=key_file``.
- ``as_(principal)``: an ``httpx.Client`` to ``secure`` that sends that principal's key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from security_helpers import ROLES, auth

from bs_coordination.apikeys import key_entry, new_api_key


@pytest.fixture
def keys() -> dict[str, str]:
    """principal -> a fresh API key."""
    return {name: new_api_key() for name in ROLES}


@pytest.fixture
def key_file(tmp_path: Path, keys: dict[str, str]) -> Path:
    path = tmp_path / "api_keys.json"
    entries = [key_entry(name, ROLES[name], keys[name]) for name in ROLES]
    path.write_text(json.dumps({"api_keys": entries}, indent=2))
    return path


@pytest.fixture
def secure(service_factory: Any, key_file: Path) -> Any:
    """The service with authentication on (memory store)."""
    return service_factory("memory", api_keys=str(key_file))


ClientFactory = Callable[..., httpx.Client]


@pytest.fixture
def as_(secure: Any, keys: dict[str, str]) -> Iterator[ClientFactory]:
    """``as_("alice")``: a client sending alice's key; ``as_(None)``: no key at all."""
    clients: list[httpx.Client] = []

    def make(principal: str | None, *, key: str | None = None) -> httpx.Client:
        if key is None and principal is not None:
            key = keys[principal]
        client = httpx.Client(base_url=secure.url, timeout=30,
                              headers=auth(key) if key is not None else {})
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()
