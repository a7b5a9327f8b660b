"""Fixtures of the preflight tests: a live service (``tests/conftest.py``'s ``service_factory``)
on the example collection or on a copy with plans a dry run cannot finish."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from preflight_collection import EXAMPLE, write_collection

#: The first dry run loads the collection in the service's child process (seconds).
HTTP_TIMEOUT = 90.0


@pytest.fixture(scope="session")
def test_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_collection(tmp_path_factory.mktemp("preflight"))


@pytest.fixture
async def api_of(service_factory: Any) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """``api_of(collection=EXAMPLE, **settings)``: an httpx client of a live service."""
    made: list[httpx.AsyncClient] = []

    def make(collection: Path | None = EXAMPLE, headers: dict[str, str] | None = None,
             **settings: Any) -> httpx.AsyncClient:
        svc = service_factory(profile_collection=str(collection) if collection else None,
                              **settings)
        made.append(httpx.AsyncClient(base_url=svc.url, timeout=HTTP_TIMEOUT,
                                      headers=headers or {}))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()
