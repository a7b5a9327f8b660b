"""``GET /metrics``: Prometheus metrics of one service process (``prometheus-client``).

``install_metrics(app)`` adds an ASGI middleware and the ``/metrics`` route. The middleware
times every HTTP request (labelled by route template, never by device name, so the label set
stays bounded), counts lock-request outcomes, and, through the app's lifespan messages,
listens to the event hub from start to shutdown to count lock events. Gauges (locks by type,
WebSocket subscribers, store up) are read at scrape time.

=============================================  =================================================
``bs_coordination_locks{lock_type,state}``      locks held now (gauge, at scrape)
``bs_coordination_lock_requests_total{outcome}``  lock requests answered by this process:
                                                ``granted``, ``conflict``, ``invalid``,
                                                ``unavailable``, ``error``
``bs_coordination_lock_grants_total``           grants (``acquired`` and ``restored`` events)
``bs_coordination_lock_conflicts_total``        requests refused because a holder was in the way
``bs_coordination_lock_preemptions_total``      locks preempted by a higher priority
``bs_coordination_lock_expiries_total``         leases that ran out
``bs_coordination_lock_events_total{action}``   every lock event, by action
``bs_coordination_http_request_duration_seconds{method,route}``  request latency (histogram)
``bs_coordination_http_requests_total{method,route,status}``     requests answered
``bs_coordination_websocket_subscribers``       open ``/ws`` connections (gauge)
``bs_coordination_store_errors_total``          requests refused because the store was down (503)
``bs_coordination_store_up``                    1 if the store answered the scrape's ping
=============================================  =================================================

Event counters count the event log, which every replica sharing a Redis store sees whole: sum
them over one replica, not all. Request counters are per process.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bs_coordination.models import LockState, LockType, LockUpdateMessage

log = logging.getLogger(__name__)

#: Latency buckets (seconds): lock operations take about a millisecond; ``wait`` may hold one long.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOCK_REQUEST_PATH = "/api/lock/request"
_OUTCOMES = {200: "granted", 409: "conflict", 503: "unavailable"}


class Tally:
    """The counters and the latency histogram, kept as plain numbers.

    Requests and events are counted on the service's event loop thread, and read there at
    scrape time. prometheus_client's own ``Counter`` and ``Histogram`` take a lock for every
    increment (three for a histogram observation), which on the lock routes cost more than the
    lock table's own bookkeeping; this collector exposes the same names, labels and types.
    """

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(("granted", "conflict", "invalid", "unavailable", "error"), 0)
        self.conflicts = self.store_errors = self.grants = self.preemptions = self.expiries = 0
        self.data_losses = 0
        self.events: dict[str, int] = {}
        self.answers: dict[tuple[str, str, str], int] = {}
        #: (method, route) -> count per bucket (the last one is +Inf), then the sum of seconds.
        self.latency: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.answers[key] = self.answers.get(key, 0) + 1
        series = self.latency.get((method, route))
        if series is None:
            series = self.latency[(method, route)] = [0.0] * (len(BUCKETS) + 2)
        series[bisect.bisect_left(BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        by_outcome = CounterMetricFamily("bs_coordination_lock_requests",
                                         "Lock requests answered, by outcome", labels=["outcome"])
        for outcome, n in self.outcomes.items():
            by_outcome.add_metric([outcome], n)
        yield by_outcome
        yield counter("bs_coordination_lock_grants", "Locks granted (acquired or restored)",
                      self.grants)
        yield counter("bs_coordination_lock_conflicts",
                      "Lock requests refused because a holder was in the way", self.conflicts)
        yield counter("bs_coordination_lock_preemptions",
                      "Locks preempted by a higher-priority request", self.preemptions)
        yield counter("bs_coordination_lock_expiries", "Leases that ran out", self.expiries)
        by_action = CounterMetricFamily("bs_coordination_lock_events", "Lock events, by action",
                                        labels=["action"])
        for action, n in self.events.items():
            by_action.add_metric([action], n)
        yield by_action
        latency = HistogramMetricFamily("bs_coordination_http_request_duration_seconds",
                                        "HTTP request latency", labels=["method", "route"])
        for labels, series in self.latency.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip((*map(floatToGoString, BUCKETS), "+Inf"), series[:-1],
                                    strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(list(labels), buckets, sum_value=series[-1])
        yield latency
        answers = CounterMetricFamily("bs_coordination_http_requests", "HTTP requests answered",
                                      labels=["method", "route", "status"])
        for labels3, n in self.answers.items():
            answers.add_metric(list(labels3), n)
        yield answers
        yield counter("bs_coordination_store_errors",
                      "Requests refused because the store was unavailable (503)", self.store_errors)
        yield counter("bs_coordination_store_data_losses",
                      "Times the store was found to have lost its data (every lock gone)",
                      self.data_losses)


class Metrics:
    """The metrics of one app, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.tally = Tally()
        r.register(self.tally)
        self.locks = Gauge("bs_coordination_locks", "Locks held now", ["lock_type", "state"], registry=r)
        self.subscribers = Gauge("bs_coordination_websocket_subscribers", "Open /ws connections", registry=r)
        self.store_up = Gauge("bs_coordination_store_up", "1 if the store answered the last scrape's ping",
                              registry=r)
        for t in LockType:  # every series exists from the start, at 0
            for s in LockState:
                self.locks.labels(t.value, s.value).set(0)

    # -- events ---------------------------------------------------------------------------
    def count_event(self, msg: LockUpdateMessage) -> None:
        """Count one event of the log (a listener of the event hub: called for every event)."""
        tally, action = self.tally, msg.action.value
        tally.events[action] = tally.events.get(action, 0) + 1
        if action in ("acquired", "restored"):
            tally.grants += 1
        elif action == "preempted":
            tally.preemptions += 1
        elif action == "expired":
            tally.expiries += 1

    def count_data_loss(self, message: str) -> None:
        """Count one loss of the store's data (a listener of the store)."""
        self.tally.data_losses += 1

    def start(self, app: Any) -> None:
        """Count the events of the app's event hub (called once its lifespan has started it)."""
        hub = getattr(app.state, "hub", None)
        if hub is not None:
            hub.add_listener(self.count_event)
        store = getattr(app.state, "store", None)
        if store is not None:
            store.add_data_loss_listener(self.count_data_loss)

    def stop(self, app: Any) -> None:
        hub = getattr(app.state, "hub", None)
        if hub is not None:
            hub.remove_listener(self.count_event)

    # -- requests -------------------------------------------------------------------------
    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        tally = self.tally
        tally.observe(method, route, status, seconds)
        if status == 503:
            tally.store_errors += 1
        if route == LOCK_REQUEST_PATH and method == "POST":
            outcome = _OUTCOMES.get(status) or ("invalid" if 400 <= status < 500 else "error")
            tally.outcomes[outcome] += 1
            if status == 409:
                tally.conflicts += 1

    async def scrape(self, app: Any) -> bytes:
        """Refresh the gauges from the store and the hub, then render the text format."""
        store = getattr(app.state, "store", None)
        hub = getattr(app.state, "hub", None)
        if hub is not None:
            self.subscribers.set(hub.subscriber_count)
        if store is not None:
            try:
                await store.ping()
                locks = await store.all_locks()
            except Exception as exc:
                log.debug("metrics: store unavailable: %s", exc)
                self.store_up.set(0)
            else:
                self.store_up.set(1)
                counts: dict[tuple[str, str], int] = {}
                for lock in locks:
                    key = (lock.lock_type.value, lock.state.value)
                    counts[key] = counts.get(key, 0) + 1
                for t in LockType:
                    for s in LockState:
                        self.locks.labels(t.value, s.value).set(counts.get((t.value, s.value), 0))
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task, no body buffering): times HTTP requests and
    starts/stops the event follower with the app's lifespan."""

    def __init__(self, app: ASGIApp, metrics: Metrics, owner: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope.get("method", "GET"), route, status, time.perf_counter() - start)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.metrics.start(self.owner)
            elif message["type"].startswith("lifespan.shutdown"):
                self.metrics.stop(self.owner)
            await send(message)

        await self.app(scope, receive, send_wrapper)


router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                     "description": "Metrics in the Prometheus text format"}},
)
async def metrics_endpoint(request: Request) -> Response:
    """Locks by type, grants, conflicts, preemptions, expiries, request latency, WebSocket
    subscribers and store errors, in the Prometheus text format."""
    metrics: Metrics = request.app.state.metrics
    return Response(await metrics.scrape(request.app), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> Metrics:
    """Add the metrics middleware and ``GET /metrics`` to ``app`` (before it starts)."""
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, owner=app)
    app.include_router(router)
    return metrics


__all__ = ["Metrics", "MetricsMiddleware", "install_metrics"]
