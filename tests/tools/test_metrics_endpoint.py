"""``GET /metrics``: parsed with prometheus_client's own parser; counters follow the actions."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servicecall import call


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}, parsed by prometheus_client."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def lock(url: str, device: str, lock_type: str = "MANUAL_OPERATOR", user: str = "alice",
         timeout: float | None = 300) -> tuple[int, Any]:
    return call(url, "/api/lock/request", {"device_name": device, "lock_type": lock_type,
                                           "user_id": user, "timeout": timeout})


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"metrics: {what} did not happen within {timeout} s"
        await asyncio.sleep(0.05)


async def test_counters_move_with_the_actions(live_service):
    url = live_service.url
    before = scrape(url)
    assert value(before, "bs_coordination_store_up") == 1
    assert value(before, "bs_coordination_locks", lock_type="MANUAL_OPERATOR", state="active") == 0

    assert lock(url, "m1")[0] == 200
    assert lock(url, "m1", user="bob")[0] == 409                             # conflict
    assert lock(url, "m1", lock_type="MAINTENANCE", user="carl")[0] == 200   # preempts alice
    assert lock(url, "m2", timeout=0.2)[0] == 200                           # will expire
    assert call(url, "/api/lock/request", {"device_name": "bad name!", "lock_type": "MAINTENANCE",
                                           "user_id": "x"})[0] == 422

    def moved() -> bool:
        s = scrape(url)
        return value(s, "bs_coordination_lock_expiries_total") >= 1

    await wait_until(moved, "the expiry of m2")
    after = scrape(url)
    assert value(after, "bs_coordination_lock_requests_total", outcome="granted") == 3
    assert value(after, "bs_coordination_lock_requests_total", outcome="conflict") == 1
    assert value(after, "bs_coordination_lock_requests_total", outcome="invalid") == 1
    assert value(after, "bs_coordination_lock_conflicts_total") == 1
    assert value(after, "bs_coordination_lock_grants_total") == 3
    assert value(after, "bs_coordination_lock_preemptions_total") == 1
    assert value(after, "bs_coordination_lock_expiries_total") == 1
    assert value(after, "bs_coordination_lock_events_total", action="acquired") == 3
    assert value(after, "bs_coordination_lock_events_total", action="preempted") == 1
    assert value(after, "bs_coordination_locks", lock_type="MAINTENANCE", state="active") == 1
    assert value(after, "bs_coordination_locks", lock_type="MANUAL_OPERATOR", state="preempted") == 1
    assert value(after, "bs_coordination_locks", lock_type="MANUAL_OPERATOR", state="active") == 0

    # Latency: one histogram series per route template, the device name never becomes a label.
    count = value(after, "bs_coordination_http_request_duration_seconds_count",
                  method="POST", route="/api/lock/request")
    assert count == 5
    assert value(after, "bs_coordination_http_request_duration_seconds_bucket",
                 method="POST", route="/api/lock/request", le="+Inf") == 5
    call(url, "/api/locks/device/m1")
    call(url, "/api/locks/device/m3")
    later = scrape(url)
    assert value(later, "bs_coordination_http_request_duration_seconds_count",
                 method="GET", route="/api/locks/device/{device_name}") == 2
    assert not any("m3" in str(labels) for _, labels in later)

    # A refused release is an answer, not a store error.
    assert call(url, "/api/lock/release", {"lock_key": "wrong-key", "device_name": "m1"})[0] == 403
    final = scrape(url)
    assert value(final, "bs_coordination_store_errors_total") == 0
    assert value(final, "bs_coordination_http_requests_total", method="POST", route="/api/lock/release",
                  status="403") == 1


async def test_websocket_subscribers_gauge(live_service):
    url = live_service.url
    assert value(scrape(url), "bs_coordination_websocket_subscribers") == 0
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(live_service.ws_url) as ws:
            first = await ws.receive_json(timeout=10)
            assert first["type"] == "initial_status"
            assert value(await asyncio.to_thread(scrape, url), "bs_coordination_websocket_subscribers") == 1
    await wait_until(lambda: value(scrape(url), "bs_coordination_websocket_subscribers") == 0,
                     "the subscriber leaving")


@pytest.mark.redis
async def test_store_errors_are_counted_while_redis_is_down(redis_server, service_factory):
    service = service_factory(redis_server.url)
    url = service.url
    assert lock(url, "m1")[0] == 200
    assert value(scrape(url), "bs_coordination_store_up") == 1
    redis_server.kill()
    try:
        status, body = lock(url, "m2")
        assert status == 503, body
        after = scrape(url)
        assert value(after, "bs_coordination_store_errors_total") >= 1
        assert value(after, "bs_coordination_store_up") == 0
        assert value(after, "bs_coordination_lock_requests_total", outcome="unavailable") == 1
    finally:
        redis_server.start()
    await wait_until(lambda: value(scrape(url), "bs_coordination_store_up") == 1, "the store coming back")


def test_metrics_need_a_read_key_when_auth_is_on(service_factory, tmp_path):
    from bs_coordination.apikeys import key_entry, new_api_key

    key = new_api_key()
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps({"api_keys": [key_entry("prometheus", ["read"], key)]}))
    service = service_factory(api_keys=str(keyfile))
    try:
        urllib.request.urlopen(service.url + "/metrics", timeout=10)
        raise AssertionError("/metrics answered without a key")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    req = urllib.request.Request(service.url + "/metrics", headers={"Authorization": f"ApiKey {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert "bs_coordination_lock_requests" in families and "bs_coordination_locks" in families
    assert key not in text
