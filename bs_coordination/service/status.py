"""The status snapshot shared by ``GET /api/locks/status`` and the WebSocket."""

from __future__ import annotations

from bs_coordination.models import LocksStatusResponse
from bs_coordination.stores import Store
from bs_coordination.stores.base import utcnow


async def locks_status(store: Store) -> LocksStatusResponse:
    """Every live lock and the id of the newest event the snapshot includes.

    The id is read *before* the locks: an event landing in between is then both in the
    snapshot and after ``last_event_id`` (applied twice, harmless), never in neither.
    """
    last_event_id = await store.last_event_id()
    locks = await store.all_locks()
    return LocksStatusResponse(locks=locks, total_count=len(locks), timestamp=utcnow(),
                               last_event_id=last_event_id)
