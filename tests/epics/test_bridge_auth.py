"""The bridge against a service with API keys: it follows with a read key, stays INVALID with
a wrong one, and never shows a key in its output."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from ca_parts import wait_until
from caproto import AlarmSeverity

from bs_coordination.apikeys import key_entry, new_api_key
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.models import LockType

pytestmark = pytest.mark.epics


def test_bridge_with_api_keys(service_factory, tmp_path, bridge_factory, ca_users):
    keys = {"reader": new_api_key(), "qs": new_api_key()}
    path = tmp_path / "api_keys.json"
    path.write_text(json.dumps({"api_keys": [key_entry("reader", ["read"], keys["reader"]),
                                             key_entry("qs", ["queue"], keys["qs"])]}))
    service = service_factory("memory", api_keys=str(path))
    good = bridge_factory(service.url, "AUTH:", ["m1"], "--api-key", keys["reader"])
    alice = ca_users("alice")
    wait_until(lambda: alice.severity("AUTH:m1:LOCK") == AlarmSeverity.NO_ALARM, 10,
               "the bridge with a read key is in step")

    async def take() -> None:
        async with DeviceCoordinationClient(service.url, api_key=keys["qs"]) as client:
            response = await client.request_lock("m1", LockType.QUEUE_EXECUTING, "whoever")
            assert response.success, response.message

    asyncio.run(take())
    wait_until(lambda: alice.read("AUTH:m1:LOCK") == 1, 2, "the bridge shows the queue's lock")
    assert alice.read("AUTH:m1:HOLDER") == "qs"  # the key's principal
    good.stop()
    wrong = bridge_factory(service.url, "AUTH:", ["m1"], "--api-key", "not-a-key")
    time.sleep(1.5)
    carol = ca_users("carol")  # a new client finds the new bridge at once (no search backoff)
    assert carol.severity("AUTH:m1:LOCK") == AlarmSeverity.INVALID_ALARM
    wrong.stop()
    assert "401" in wrong.output(), wrong.output()
    for text in (good.output(), wrong.output()):
        assert keys["reader"] not in text and keys["qs"] not in text and "not-a-key" not in text
