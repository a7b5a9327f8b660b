"""The dashboard at ``GET /`` in a real headless Chromium: what an operator sees."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

from headless import browser_or_skip, headless_chromium
from tcpproxy import CuttableProxy

ROWS = """[...document.querySelectorAll('#locks tbody tr')].map(tr => ({
    device: tr.dataset.device, state: tr.dataset.state,
    cells: [...tr.children].map(td => td.innerText.trim())}))"""


#: Whether the lock table is on screen.
VISIBLE_TABLE = "document.querySelector('#locks').getClientRects().length > 0"


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def lock(url: str, device: str, **extra: Any) -> str:
    status, body = post(url + "/api/lock/request", {"device_name": device, **extra})
    assert status == 200, body
    return str(body["lock_key"])


def test_page_is_self_contained(live_service):
    with urllib.request.urlopen(live_service.url + "/", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        html = resp.read().decode()
    # No CDN, no external script or stylesheet: beamline networks have no internet.
    assert "<script src" not in html and "<link" not in html and "http://" not in html.replace(
        "http://www.w3.org", "")
    assert "https://" not in html


async def test_lock_appears_and_disappears_live(live_service):
    browser = browser_or_skip()
    url = live_service.url
    # Something happened before the page opened: it shows in the recent events, not the table.
    early = lock(url, "m0", lock_type="MANUAL_OPERATOR", user_id="dora")
    assert post(url + "/api/lock/release", {"lock_key": early})[0] == 200
    async with headless_chromium(browser) as page:
        await page.goto(url + "/")
        await page.wait_for("document.querySelector('#conn').innerText === 'live'")
        assert await page.evaluate("document.querySelector('#empty').style.display") != "none"
        await page.wait_for("document.querySelectorAll('#events li').length === 2")

        key = lock(url, "m1", lock_type="MANUAL_OPERATOR", user_id="alice", reason="align optics",
                   timeout=600)
        rows = await page.wait_for(f"(r => r.length === 1 && r)({ROWS})")
        # The fencing token is not a column an operator needs.
        device, kind, holder, reason, _since, until = rows[0]["cells"]
        assert (device, kind, holder, reason) == ("m1", "MANUAL_OPERATOR", "alice", "align optics")
        headers = await page.evaluate("[...document.querySelectorAll('#locks th')].map(th => th.innerText)")
        assert headers == ["Device", "Type", "Holder", "Reason", "Since", "Until"]
        assert rows[0]["state"] == "active"
        assert "(9m" in until or "(10m" in until  # the countdown of a 600 s lease
        colour = await page.evaluate(
            "getComputedStyle(document.querySelector('#locks tbody tr td')).borderLeftColor")
        assert colour == "rgb(239, 108, 0)"  # MANUAL_OPERATOR's colour

        # Maintenance preempts: its lock on top, alice's shown under it as preempted.
        mkey = lock(url, "m1", lock_type="MAINTENANCE", user_id="carl", reason="encoder fault",
                    timeout=None)
        rows = await page.wait_for(f"(r => r.length === 2 && r[1].state === 'preempted' && r)({ROWS})")
        assert rows[0]["cells"][1:4] == ["MAINTENANCE", "carl", "encoder fault"]
        assert rows[0]["cells"][5] == "no expiry"
        assert rows[1]["cells"][2] == "alice" and "preempted by carl" in rows[1]["cells"][3]

        # Released: alice's lock is restored, then gone too.
        assert post(url + "/api/lock/release", {"lock_key": mkey})[0] == 200
        rows = await page.wait_for(f"(r => r.length === 1 && r[0].cells[1] === 'MANUAL_OPERATOR' && r)({ROWS})")
        assert rows[0]["state"] == "active" and rows[0]["cells"][2] == "alice"
        assert post(url + "/api/lock/release", {"lock_key": key})[0] == 200
        await page.wait_for(f"{ROWS}.length === 0")
        assert await page.evaluate("document.querySelector('#empty').style.display") != "none"

        actions = await page.evaluate(
            "[...document.querySelectorAll('#events li')].map(li => li.dataset.action)")
        # Newest first; the preemption's two events come from one change, in either order.
        assert actions[:3] == ["released", "restored", "released"]
        assert sorted(actions[3:5]) == ["acquired", "preempted"] and actions[5:] == ["acquired", "released", "acquired"]
        assert page.errors == []


async def test_dashboard_is_correct_after_a_reconnect(live_service):
    """The network drops; meanwhile the locks change. Once the page is back it shows exactly
    the current locks, and its recent events are the service's, none missed, none twice."""
    browser = browser_or_skip()
    url = live_service.url
    port = int(url.rsplit(":", 1)[1])
    proxy = CuttableProxy("127.0.0.1", port)
    await proxy.start()
    try:
        async with headless_chromium(browser) as page:
            await page.goto(f"http://127.0.0.1:{proxy.port}/")
            await page.wait_for("document.querySelector('#conn').innerText === 'live'")
            key1 = lock(url, "m1", lock_type="MANUAL_OPERATOR", user_id="alice")
            await page.wait_for(f"{ROWS}.length === 1")

            proxy.cut()
            await page.wait_for("document.querySelector('#conn').innerText.startsWith('reconnecting')")
            assert post(url + "/api/lock/release", {"lock_key": key1})[0] == 200
            lock(url, "m2", lock_type="QUEUE_EXECUTING", user_id="queue", reason="count", timeout=300)
            key3 = lock(url, "m3", lock_type="MANUAL_OPERATOR", user_id="carl")
            assert post(url + "/api/lock/release", {"lock_key": key3})[0] == 200
            # Cut off, the page cannot vouch for any lock: it shows no table, and says so.
            assert await page.evaluate(VISIBLE_TABLE) is False
            text = await page.evaluate("document.body.innerText")
            assert "reconnecting" in text and "not shown" in text and "No device is locked" not in text

            proxy.restore()
            await page.wait_for("document.querySelector('#conn').innerText === 'live'")
            rows = await page.wait_for(f"(r => r.length === 1 && r[0].device === 'm2' && r)({ROWS})")
            assert rows[0]["cells"][1:4] == ["QUEUE_EXECUTING", "queue", "count"]
            assert await page.evaluate("window.bsDashboard.reconnects") >= 1

            with urllib.request.urlopen(url + "/api/events", timeout=10) as resp:
                log = json.loads(resp.read())["events"]
            shown = await page.wait_for(
                f"(ids => ids.length === {len(log)} && ids)"
                "([...document.querySelectorAll('#events li')].map(li => li.dataset.eventId))")
            assert shown == [e["event_id"] for e in reversed(log)]
            assert page.errors == []
    finally:
        await proxy.close()


async def test_dashboard_after_the_service_restarts_with_an_empty_table(service_factory):
    """A memory-store service restarts (here: the page's link now leads to a fresh one): its
    event ids start again. The page must drop the old locks and show the new events."""
    browser = browser_or_skip()
    old, new = service_factory("memory"), service_factory("memory")
    proxy = CuttableProxy("127.0.0.1", int(old.url.rsplit(":", 1)[1]))
    await proxy.start()
    try:
        async with headless_chromium(browser) as page:
            await page.goto(f"http://127.0.0.1:{proxy.port}/")
            await page.wait_for("document.querySelector('#conn').innerText === 'live'")
            for device in ("m1", "m2", "m3"):
                lock(old.url, device, lock_type="MANUAL_OPERATOR", user_id="alice")
            await page.wait_for(f"{ROWS}.length === 3")

            proxy.cut()
            await page.wait_for("document.querySelector('#conn').innerText.startsWith('reconnecting')")
            proxy.target = ("127.0.0.1", int(new.url.rsplit(":", 1)[1]))
            proxy.restore()
            await page.wait_for("document.querySelector('#conn').innerText === 'live'")
            await page.wait_for(f"{ROWS}.length === 0")
            assert "restarted" in await page.evaluate("document.querySelector('#footer').innerText")

            lock(new.url, "m9", lock_type="QUEUE_EXECUTING", user_id="queue", timeout=60)
            rows = await page.wait_for(f"(r => r.length === 1 && r)({ROWS})")
            assert rows[0]["device"] == "m9"
            # The new service's first event has an id the old one used too: it must still show.
            actions = await page.wait_for(
                "(a => a.length === 1 && a)([...document.querySelectorAll('#events li')]"
                ".map(li => li.dataset.action + ' ' + li.innerText.includes('m9')))")
            assert actions == ["acquired true"]
            assert page.errors == []
    finally:
        await proxy.close()


async def test_no_lock_table_before_the_first_status(live_service):
    """The page opens while the service's WebSocket has said nothing yet (held back here by a
    gate in front of it): it says it is connecting and shows no table, and certainly not
    "No device is locked." while a device is locked. Once the status arrives, the lock shows."""
    browser = browser_or_skip()
    url = live_service.url
    lock(url, "m1", lock_type="MANUAL_OPERATOR", user_id="alice", reason="align optics")
    gate = asyncio.Event()
    async with gated_service(url, gate) as gated_url, headless_chromium(browser) as page:
        await page.goto(gated_url + "/")
        await page.wait_for("document.querySelector('#conn').innerText.startsWith('connecting')")
        await page.wait_for("window.bsDashboard.reconnects === 0 && document.readyState === 'complete'")
        text = await page.evaluate("document.body.innerText")
        assert "Connecting to the lock service" in text
        assert "No device is locked" not in text
        assert await page.evaluate(VISIBLE_TABLE) is False

        gate.set()
        await page.wait_for("document.querySelector('#conn').innerText === 'live'")
        rows = await page.wait_for(f"(r => r.length === 1 && r)({ROWS})")
        assert rows[0]["cells"][:4] == ["m1", "MANUAL_OPERATOR", "alice", "align optics"]
        assert await page.evaluate(VISIBLE_TABLE) is True
        assert "Connecting" not in await page.evaluate("document.body.innerText")
        assert page.errors == []


async def test_leases_about_to_end_stand_out(live_service):
    browser = browser_or_skip()
    url = live_service.url
    lock(url, "m1", lock_type="MANUAL_OPERATOR", user_id="alice", timeout=600)
    lock(url, "m2", lock_type="QUEUE_EXECUTING", user_id="queue", timeout=45)
    async with headless_chromium(browser) as page:
        await page.goto(url + "/")
        await page.wait_for(f"{ROWS}.length === 2")
        rows = await page.evaluate("""[...document.querySelectorAll('#locks tbody tr')].map(tr => ({
            device: tr.dataset.device, ending: tr.classList.contains('ending'),
            background: getComputedStyle(tr.children[0]).backgroundColor,
            note: getComputedStyle(tr.querySelector('td.countdown'), '::after').content}))""")
        by_device = {r["device"]: r for r in rows}
        assert by_device["m2"]["ending"] is True and by_device["m1"]["ending"] is False
        assert by_device["m2"]["background"] != by_device["m1"]["background"]
        assert "ending soon" in by_device["m2"]["note"]
        assert "ending soon" not in by_device["m1"]["note"]
        assert page.errors == []


@contextlib.asynccontextmanager
async def gated_service(url: str, gate: asyncio.Event) -> AsyncIterator[str]:
    """A front for the service at ``url`` whose WebSocket says nothing until ``gate`` is set,
    then relays the service's; pages and HTTP calls go straight through."""
    from aiohttp import ClientSession, WSMsgType, web

    async def relay_http(request: web.Request) -> web.Response:
        async with ClientSession() as session, session.get(url + request.path_qs) as resp:
            return web.Response(body=await resp.read(), status=resp.status,
                                content_type=resp.content_type)

    async def relay_ws(request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse()
        await client.prepare(request)
        await gate.wait()
        async with ClientSession() as session, session.ws_connect(
                url.replace("http", "ws", 1) + request.path_qs) as upstream:
            async def down() -> None:
                async for frame in upstream:
                    if frame.type == WSMsgType.TEXT:
                        await client.send_str(frame.data)
            task = asyncio.create_task(down())
            async for frame in client:
                if frame.type == WSMsgType.TEXT:
                    await upstream.send_str(frame.data)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return client

    app = web.Application()
    app.router.add_get("/ws", relay_ws)
    app.router.add_get("/{tail:.*}", relay_http)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        gate.set()
        await runner.cleanup()


async def test_recent_events_say_who_force_released(live_service):
    browser = browser_or_skip()
    url = live_service.url
    lock(url, "m1", lock_type="MANUAL_OPERATOR", user_id="alice")
    async with headless_chromium(browser) as page:
        await page.goto(url + "/")
        await page.wait_for(f"{ROWS}.length === 1")
        status, _ = post(url + "/api/lock/force-release",
                         {"device_name": "m1", "reason": "stuck", "user_id": "carl"})
        assert status == 200
        text = await page.wait_for(
            "(li => li && li.innerText)(document.querySelector('#events li[data-action=force_released]'))")
        assert "alice" in text and "by carl" in text
        assert page.errors == []
