"""``/docs`` and ``/redoc`` work without internet: their pages load Swagger UI and ReDoc from the
service itself, and with API keys on they need a key like every other page."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from headless import browser_or_skip, headless_chromium

from bs_coordination.apikeys import key_entry, new_api_key

PAGES = ("/docs", "/redoc")


def fetch(url: str, api_key: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body)."""
    headers = {"Authorization": f"ApiKey {api_key}"} if api_key else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def asset_urls(html: str) -> list[str]:
    """Every ``src``/``href`` a page loads."""
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", PAGES)
def test_pages_load_their_assets_from_the_service(live_service, page):
    status, kind, body = fetch(live_service.url + page)
    assert status == 200 and kind.startswith("text/html")
    html = body.decode()
    assets = asset_urls(html)
    assert any(a.endswith(".js") for a in assets), assets
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        status, kind, content = fetch(live_service.url + asset)
        assert status == 200 and content, asset
        if asset.endswith(".js"):
            assert "javascript" in kind, (asset, kind)
        elif asset.endswith(".css"):
            assert kind.startswith("text/css"), (asset, kind)


async def test_pages_render_in_a_browser_without_internet(live_service):
    """Chromium here has no internet: a page that needed a CDN would stay blank."""
    browser = browser_or_skip()
    async with headless_chromium(browser) as page:
        await page.goto(live_service.url + "/docs")
        # Swagger UI lists the operations of the OpenAPI document.
        paths = await page.wait_for(
            "(p => p.length > 3 && p)([...document.querySelectorAll('.opblock-summary-path')]"
            ".map(e => e.innerText))", timeout=30)
        assert any("/api/lock/request" in p for p in paths)

        await page.goto(live_service.url + "/redoc")
        text = await page.wait_for(
            "(t => t.includes('/api/lock/request') && t)(document.body.innerText)", timeout=30)
        assert "bs-coordination" in text
        assert page.errors == []


def test_with_api_keys_the_pages_and_assets_need_a_key(service_factory, tmp_path: Path):
    reader = new_api_key()
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps({"api_keys": [key_entry("viewer", ["read"], reader)]}))
    service = service_factory(api_keys=str(keyfile))
    for page in PAGES:
        assert fetch(service.url + page)[0] == 401
        assert fetch(service.url + page, "not-a-key")[0] == 401
        status, _, body = fetch(service.url + page, reader)
        assert status == 200
        for asset in asset_urls(body.decode()):
            assert fetch(service.url + asset)[0] == 401, asset
            assert fetch(service.url + asset, reader)[0] == 200, asset
