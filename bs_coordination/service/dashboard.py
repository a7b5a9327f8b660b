"""``GET /``: the operators' live lock dashboard.

One self-contained HTML page (inline CSS and JavaScript: beamline networks often have no
internet, so no CDN and no build step). It reads everything it shows from ``WS /ws``: the
``initial_status`` rebuilds the table, ``lock_update`` events keep it, and after a lost
connection it reconnects with ``?since=<last event id>``, so its list of recent events has no gap
and its table is whatever the fresh ``initial_status`` says. The page itself holds no data.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])


@lru_cache(maxsize=1)
def dashboard_html() -> str:
    """The page, read once from the package."""
    return resources.files("bs_coordination.service").joinpath("static/dashboard.html").read_text("utf-8")


@router.get("/", response_class=HTMLResponse, summary="Live lock dashboard (HTML page)")
async def dashboard() -> HTMLResponse:
    """A live table of every lock, with countdowns and recent events, for operators."""
    # no-cache: after an upgrade the browser must not keep an old page talking to a new service.
    return HTMLResponse(dashboard_html(), headers={"Cache-Control": "no-cache"})
