"""``POST /api/preflight``: which devices a queue item's plan will touch, and what holds them.

Plug in with ``app.include_router(preflight.router)``; the ``PreflightRunner`` (the warm
dry-run child) is made on first use and kept in ``app.state.preflight``; the router's own
lifespan (FastAPI nests it in the app's) stops the child at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from starlette.requests import HTTPConnection

from bs_coordination.models import ErrorResponse

from ..deps import StoreDep, get_principal
from ..discovery import DEFAULT_DISCOVERY_TIMEOUT
from ..preflight import (
    DEFAULT_PREFLIGHT_TIMEOUT,
    RECENT_SECONDS,
    CheckedItems,
    CheckedItemsResponse,
    PreflightRequest,
    PreflightResponse,
    preflight,
)
from ..preflight_runner import PreflightRunner


def runner_of(app: FastAPI | Any) -> PreflightRunner:
    """The app's dry-run runner, made on first use (its child starts at the first dry run)."""
    runner: PreflightRunner | None = getattr(app.state, "preflight", None)
    if runner is None:
        settings = app.state.settings
        runner = PreflightRunner(
            app.state.devices,
            time_limit=getattr(settings, "preflight_timeout", DEFAULT_PREFLIGHT_TIMEOUT),
            load_timeout=getattr(settings, "discovery_timeout", DEFAULT_DISCOVERY_TIMEOUT))
        app.state.preflight = runner
    return runner


def checked_of(app: FastAPI | Any) -> CheckedItems:
    """The app's memory of recently checked queue items."""
    checked: CheckedItems | None = getattr(app.state, "preflight_checked", None)
    if checked is None:
        checked = app.state.preflight_checked = CheckedItems()
    return checked


async def close_runner(app: FastAPI | Any) -> None:
    """Stop the app's dry-run child, if it has one (call at shutdown)."""
    runner: PreflightRunner | None = getattr(app.state, "preflight", None)
    if runner is not None:
        await runner.close()


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await close_runner(app)


# Every route needs a valid key when authentication is on (any role: `read` suffices).
router = APIRouter(prefix="/api", tags=["preflight"], dependencies=[Depends(get_principal)],
                   lifespan=_lifespan)


def _errors(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": text} for c, text in codes.items()}


@router.post(
    "/preflight",
    response_model=PreflightResponse,
    responses=_errors({
        409: "No profile collection is configured (start the service with "
             "--profile-collection).",
        422: "Not a valid request, an unknown plan, arguments that do not bind to it, or an "
             "item that is not a plan; `message` names the problem.",
        503: "The profile collection could not be loaded for the dry run, or the lock store "
             "is unavailable; `message` says why.",
    }),
    summary="Predict a queue item's devices and the locks in its way",
)
async def preflight_item(body: PreflightRequest, conn: HTTPConnection,
                         store: StoreDep) -> PreflightResponse:
    """Dry-run the item's plan (in a child process that loaded the profile collection; its
    messages go to bluesky's `RunEngineSimulator`, never to a device) and answer the root
    devices it touches, each marked `argument` (named in the item) or `dry_run` (found only by
    the dry run, e.g. a device of the startup code), and the locks a `QUEUE_EXECUTING`
    request would not preempt on them (MAINTENANCE, or an equal-priority holder): `can_start`
    is false when there is one.

    `complete` is false, with `reason`, when the dry run could not finish: an adaptive plan
    that needs real readings, a time-out (`--preflight-timeout`), or an exception; the
    argument devices still count. A plan's dry run never hangs or crashes the service."""
    return await preflight(runner_of(conn.app), store, body.item, checked_of(conn.app))


@router.get(
    "/preflight/items", response_model=CheckedItemsResponse,
    responses=_errors({503: "The lock store is unavailable."}),
    summary="Queue items checked recently, with the locks in their way now",
    description=f"Queue items (with an `item_uid`) that `POST /api/preflight` checked within the "
    f"last {RECENT_SECONDS:g} s, newest first: their predicted devices and, recomputed from the "
    "lock table now, the locks in their way and `can_start`. `bs-coordination-reserve` checks "
    "every waiting item regularly, so while it runs this lists the queue's waiting plans (an "
    f"item that left the queue drops out within {RECENT_SECONDS:g} s). Kept by this service "
    "process only.")
async def checked_items(conn: HTTPConnection, store: StoreDep) -> CheckedItemsResponse:
    """The dashboard's waiting plans that would be blocked."""
    return await checked_of(conn.app).current(store)
