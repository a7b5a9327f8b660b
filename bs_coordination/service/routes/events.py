"""Event history: the same log the WebSocket and the RunEngine suspender follow."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from bs_coordination.errors import InvalidRequestError
from bs_coordination.models import EventsResponse
from bs_coordination.stores import EventGap
from bs_coordination.stores.base import event_order

from ..deps import StoreDep, get_principal
from ..handlers import error_responses

router = APIRouter(prefix="/api", tags=["events"], dependencies=[Depends(get_principal)])

MAX_EVENTS_PAGE = 10_000


@router.get(
    "/events",
    response_model=EventsResponse,
    responses=error_responses(410, 422, 503),
    summary="Event history (audit), oldest first",
)
async def events(
    store: StoreDep,
    since: Annotated[str | None, Query(max_length=64, description=(
        "Return events after this id (from `last_event_id` or an event's `event_id`); "
        "without it, the newest `limit` retained events; `0`: from the first event. 410 if "
        "the log no longer reaches back to it, or never issued it (the service restarted): "
        "reload `/api/locks/status` and continue from its `last_event_id`."))] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE)] = 1000,
) -> EventsResponse:
    """Events after ``since``, at most ``limit`` of them. Page by passing the last
    ``event_id`` received as the next ``since``."""
    if since is not None:
        try:
            event_order(since)
        except ValueError:
            raise InvalidRequestError(
                f"since: {since[:40]!r} is not an event id of this service", field="since"
            ) from None
    last = await store.last_event_id()
    wanted = event_order(since) if since is not None else (0,)
    if any(wanted) and (last is None or wanted > event_order(last)):
        # Not an id this log issued (a restarted memory store starts again at 1): answering
        # "nothing new" would hide every event until the counter passes it again.
        raise EventGap(f"event {since} is unknown here (newest is {last}; did the service restart?)")
    got = await store.events_after(since, limit=limit)
    return EventsResponse(events=got, last_event_id=got[-1].event_id if got else (since or last))
