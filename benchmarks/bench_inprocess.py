"""Where the service's time goes: one lock request (and one release) through the ASGI app in
process, with no network and no load generator, against a trivial FastAPI JSON endpoint called
the same way in the same run. Run: ``python benchmarks/bench_inprocess.py``."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import HEADER, row

from bs_coordination.service import create_app
from bs_coordination.service.config import Settings


async def call(app: Any, path: str, body: Any) -> tuple[int, bytes]:
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    await app(scope, receive, send)
    return out[0]["status"], b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")


def trivial_app() -> FastAPI:
    app = FastAPI()

    class Body(BaseModel):
        device_name: str
        user_id: str

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, str]:
        return {"device_name": body.device_name, "user_id": body.user_id}

    return app


async def main(pairs: int = 3000) -> None:
    app = create_app(Settings())
    anchor = trivial_app()
    async with app.router.lifespan_context(app):
        async def lock_pairs(n: int) -> float:
            t0 = time.perf_counter()
            for i in range(n):
                body = {"device_name": f"d{i % 20}", "lock_type": "MANUAL_OPERATOR", "user_id": "u"}
                status, raw = await call(app, "/api/lock/request", body)
                assert status == 200, raw
                status, raw = await call(app, "/api/lock/release", {"lock_key": json.loads(raw)["lock_key"]})
                assert status == 200, raw
            return (time.perf_counter() - t0) / (2 * n)

        async def trivial(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                await call(anchor, "/echo", {"device_name": "d", "user_id": "u"})
            return (time.perf_counter() - t0) / n

        await lock_pairs(300)
        await trivial(300)
        # Interleaved rounds, medians: other jobs on the machine bias neither side.
        rounds = [(await lock_pairs(pairs // 5), await trivial(2 * pairs // 5)) for _ in range(9)]
        service_s = statistics.median(r[0] for r in rounds)
        anchor_s = statistics.median(r[1] for r in rounds)
    print(HEADER)
    print(row("one lock request or release, in process (no network)", f"{service_s * 1e6:.0f} us",
              f"trivial FastAPI {anchor_s * 1e6:.0f} us", service_s / anchor_s, "context (no target)"))


if __name__ == "__main__":
    asyncio.run(main())
