"""The dashboard's "waiting plans that would be blocked" in a real headless Chromium: a queue
item checked by preflight appears there while MAINTENANCE holds a device its plan will touch
(one it does not even name), and disappears when the device is released."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from headless import browser_or_skip, headless_chromium

EXAMPLE = Path(__file__).resolve().parents[2] / "profile_collection_example"
BLOCKED = """[...document.querySelectorAll('#blocked li')].map(li => ({
    uid: li.dataset.itemUid, text: li.innerText.trim()}))"""
SHOWN = "document.querySelector('#blocked-plans').getClientRects().length > 0"


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=90) as resp:
        return resp.status, json.loads(resp.read())


async def test_blocked_waiting_plans_are_shown(service_factory: Any) -> None:
    browser = browser_or_skip()
    url = service_factory(profile_collection=str(EXAMPLE)).url
    item = {"name": "park_and_count", "args": [["det1"]], "item_uid": "item-42"}
    status, body = post(url + "/api/lock/request", {
        "device_name": "motor2", "lock_type": "MAINTENANCE", "user_id": "bob",
        "reason": "bake-out of the axis", "timeout": 600})
    assert status == 200, body
    key = body["lock_key"]
    status, answer = post(url + "/api/preflight", {"item": item})
    assert status == 200 and answer["can_start"] is False, answer
    post(url + "/api/preflight", {"item": {"name": "count", "args": [["det2"]],
                                           "item_uid": "item-43"}})
    async with headless_chromium(browser) as page:
        await page.goto(url + "/")
        rows = await page.wait_for(f"(r => r.length === 1 && r)({BLOCKED})")
        assert rows[0]["uid"] == "item-42"
        text = rows[0]["text"]
        assert text.startswith("park_and_count [item item-42]: motor2 held by bob")
        assert "MAINTENANCE: bake-out of the axis" in text and "until" in text
        assert await page.evaluate(SHOWN)
        assert "(1 of 2 checked)" in await page.evaluate(
            "document.querySelector('#blocked-count').textContent")

        assert post(url + "/api/lock/release", {"lock_key": key})[0] == 200
        await page.wait_for(f"!({SHOWN})")
        assert await page.evaluate(f"{BLOCKED}.length") == 0
        assert page.errors == []
