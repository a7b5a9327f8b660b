"""The lock service: ``create_app()`` (an ASGI app factory) and ``DeviceCoordinationService``.

Run it with ``python -m bs_coordination.service --help``, ``bs-coordination-service``, or
``uvicorn --factory bs_coordination.service:create_app``.
"""

from __future__ import annotations

from typing import Any

from .app import create_app
from .config import Settings, parse_settings

#: Largest WebSocket frame the server accepts (clients only send ping and get_status).
WS_MAX_BYTES = 64 * 1024


class DeviceCoordinationService:
    """The service as an object, as in the original API::

        service = DeviceCoordinationService(profile_collection_path="/path/to/profile")
        service.run(host="0.0.0.0", port=60620)

    Extra keyword arguments are ``Settings`` fields (``store="redis://..."``, ``log_level``...).
    """

    def __init__(self, profile_collection_path: str | None = None, host: str = "0.0.0.0",
                 port: int = 60620, store: str = "memory", **settings: Any) -> None:
        self.settings = Settings(host=host, port=port, store=store,
                                 profile_collection=profile_collection_path, **settings)
        self.app = create_app(self.settings)

    def run(self, host: str | None = None, port: int | None = None) -> None:
        """Serve until interrupted (blocking)."""
        run_app(self.app, self.settings, host=host, port=port)


def run_app(app: Any, settings: Settings, host: str | None = None, port: int | None = None) -> None:
    import logging

    import uvicorn

    logging.getLogger("bs_coordination").setLevel(settings.log_level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host or settings.host, port=port or settings.port,
                log_level=settings.log_level.lower(), ws_max_size=WS_MAX_BYTES)


__all__ = ["DeviceCoordinationService", "Settings", "create_app", "parse_settings"]
