"""Say once that the lock store is unavailable, count what it refused, say when it is back.

With Redis stopped every lock request is answered 503; one client retrying makes about twenty
a second, and a log line for each buries everything else. Instead: one WARNING when the outage
starts (with the store's own message), a DEBUG line per refused request, and one WARNING when
the store answers again, with how long it was gone and how many requests were refused.

The outage starts at the first failure seen (a refused request, the expiry sweep, the
readiness probe) and ends at the first success of the sweep or the probe; the sweep runs every
``app.SWEEP_SECONDS``, so the end is noticed within about that after the store returns.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class StoreOutage:
    """The state of one app's store, as its log tells it (see the module docstring)."""

    def __init__(self) -> None:
        #: ``time.monotonic()`` when the outage started; ``None`` while the store answers.
        self.since: float | None = None
        #: Requests answered 503 since the outage started.
        self.refused = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, message: str, refused: str | None = None) -> None:
        """The store failed with ``message``; ``refused`` names a request answered 503."""
        if self.since is None:
            self.since = time.monotonic()
            self.refused = 0
            log.warning("%s; answering 503 to lock operations until it is back (refused "
                        "requests are counted, not logged one by one)", message)
        if refused is not None:
            self.refused += 1
            log.debug("refused %s: %s", refused, message)

    def recovered(self) -> None:
        """The store answered: end the outage, if there was one."""
        if self.since is None:
            return
        seconds = time.monotonic() - self.since
        self.since = None
        log.warning("lock store available again after %.1f s; %d request(s) were refused "
                    "with 503 meanwhile", seconds, self.refused)
        self.refused = 0
