"""The application factory: ``create_app(settings)`` builds a FastAPI app whose lifespan owns
the store, the expiry sweeper and the event hub.

Also usable as ``uvicorn --factory bs_coordination.service:create_app`` (settings then come
from the ``COORDINATION_*`` environment variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from bs_coordination.errors import StoreUnavailableError
from bs_coordination.stores import Store, open_store

from .auth import install_auth
from .config import Settings, SettingsError, parse_settings
from .dashboard import router as dashboard_router
from .discovery import DeviceRegistry, DiscoveryConfig
from .docs import install_docs
from .handlers import install_handlers
from .hub import EventHub
from .limits import install_limits
from .logfilter import install_query_filter
from .metrics import install_metrics
from .outage import StoreOutage
from .routes import device_config, events, health, locks, preflight
from .tasks import stop
from .ws import router as ws_router

log = logging.getLogger(__name__)

#: How often expired leases are swept; ``expired`` events follow expiry within about this.
SWEEP_SECONDS = 0.2

async def sweep_forever(store: Store, interval: float = SWEEP_SECONDS,
                        outage: StoreOutage | None = None) -> None:
    """Expire leases that ran out, forever; an error is logged and the sweep goes on.

    With ``outage``, an unavailable store is reported there (once per outage, see
    ``outage.py``) and a sweep that works again ends the outage."""
    failing = False
    while True:
        try:
            await store.sweep()
            if outage is not None:
                outage.recovered()
            if failing:
                log.info("expiry sweep works again")
            failing = False
        except asyncio.CancelledError:
            raise
        except StoreUnavailableError as exc:
            if outage is not None:
                outage.failed(exc.message)
            elif not failing:
                log.warning("expiry sweep failed; retrying: %s", exc.message)
                failing = True
        except Exception:
            if not failing:  # one warning per outage, not five per second
                log.warning("expiry sweep failed; retrying", exc_info=True)
            failing = True
        await asyncio.sleep(interval)


def create_app(settings: Settings | None = None, *, store: Store | None = None) -> FastAPI:
    """Build the service. ``store`` replaces the one ``settings.store`` names (tests pass a
    store with a manual clock); either way the app starts and closes it."""
    if settings is None:
        settings = parse_settings([], os.environ)
    install_query_filter()
    # Log levels and handlers are the runner's business (``__main__``, ``DeviceCoordinationService
    # .run``): an app factory that changed global logging would surprise its host process.

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_query_filter()  # again: a server may have reconfigured logging meanwhile
        st = store if store is not None else open_store(settings.store,
                                                        timeout=settings.store_timeout)
        st.preempt_ack_timeout = settings.preempt_ack_timeout
        await st.start()
        hub = EventHub(settings.ws_queue_size)
        app.state.store = st
        app.state.hub = hub
        st.add_data_loss_listener(hub.store_lost)
        hub.start(st)
        sweeper = asyncio.create_task(sweep_forever(st, outage=app.state.store_outage),
                                      name="bs-coordination-sweeper")
        app.state.devices.start()  # in the background: locking works while it runs
        log.info("lock service ready (store: %s)", st.kind)
        try:
            yield
        finally:
            await stop(sweeper)
            await app.state.devices.close()
            await hub.stop()
            await st.close()

    app = FastAPI(
        title="bs-coordination",
        summary="Device locks for Bluesky beamlines: priorities, leases, live events.",
        version=_version(),
        lifespan=lifespan,
        # /docs and /redoc are served from the package (docs.py), not FastAPI's CDN pages.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store_outage = StoreOutage()
    app.state.devices = DeviceRegistry(DiscoveryConfig.from_settings(settings))
    install_handlers(app)
    # Middleware added later wraps what was added before: CORS (answers preflights), then the
    # body limit (413 before anything else reads), then the API key check.
    try:
        install_auth(app, settings.api_keys)
    except ValueError as exc:
        raise SettingsError(f"--api-keys: {exc}") from None
    install_limits(app, settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.include_router(locks.router)
    app.include_router(events.router)
    app.include_router(health.router)
    app.include_router(device_config.router)
    app.include_router(preflight.router)
    app.include_router(ws_router)
    app.include_router(dashboard_router)
    install_docs(app)
    install_metrics(app)  # the outermost middleware: it times every answer, 401 and 413 too
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bs-coordination")
    except PackageNotFoundError:
        return "0"
