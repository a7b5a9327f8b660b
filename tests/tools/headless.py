"""A real headless Chromium driven over the Chrome DevTools Protocol (aiohttp WebSocket).

No Playwright and no browser download: Debian's ``chromium`` package. ``find_browser()`` says
where it is; ``BS_COORDINATION_REQUIRE_BROWSER=1`` (CI) makes a missing browser a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REQUIRE_BROWSER = os.environ.get("BS_COORDINATION_REQUIRE_BROWSER") == "1"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_SECONDS = 30.0


def find_browser() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


def browser_or_skip() -> str:
    path = find_browser()
    if path is None:
        message = ("no Chromium found (install Debian's: apt-get install -y chromium); "
                   "the dashboard is tested in a real browser")
        if REQUIRE_BROWSER:
            pytest.fail(message + " and BS_COORDINATION_REQUIRE_BROWSER=1 requires it")
        pytest.skip(message)
    return path


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the browser and every process of the group it leads (it was started as leader)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.stderr:
        proc.stderr.close()


class Page:
    """One tab: ``evaluate`` JavaScript, ``wait_for`` a condition; JS errors are collected."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(frame.data)
            if "id" in msg and msg["id"] in self._pending:
                fut = self._pending.pop(msg["id"])
                if not fut.done():
                    if "error" in msg:
                        fut.set_exception(RuntimeError(f"CDP error: {msg['error']}"))
                    else:
                        fut.set_result(msg.get("result", {}))
            elif msg.get("method") == "Runtime.exceptionThrown":
                details = msg["params"]["exceptionDetails"]
                self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
            elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"].get("type") == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in msg["params"]["args"]))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the browser closed the DevTools connection"))

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 15.0) -> Any:
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        return await asyncio.wait_for(fut, timeout)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete'")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """The first truthy value of ``expression``; ``AssertionError`` naming it on timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.evaluate(expression)
            if last:
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"page: {expression} still {last!r} after {timeout} s; JS errors: {self.errors}")

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self.ws.close()


@contextlib.asynccontextmanager
async def headless_chromium(binary: str) -> AsyncIterator[Page]:
    """Start Chromium with a private profile and no network chatter; yield its first tab."""
    # Chromium's helper processes may still be writing the profile while they exit.
    with tempfile.TemporaryDirectory(prefix="bs-coord-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--no-default-browser-check", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the renderers go with it
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + START_SECONDS
            while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
                if proc.poll() is not None:
                    raise RuntimeError(f"chromium exited ({proc.returncode}): "
                                       f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chromium opened no DevTools port within {START_SECONDS} s")
                await asyncio.sleep(0.05)
            port = int(port_file.read_text().splitlines()[0])
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = await resp.json()
                page_target = next(t for t in targets if t.get("type") == "page")
                ws = await session.ws_connect(page_target["webSocketDebuggerUrl"], max_msg_size=0)
                page = Page(ws)
                try:
                    await page.send("Runtime.enable")
                    await page.send("Page.enable")
                    yield page
                finally:
                    await page.close()
        finally:
            stop_group(proc)
