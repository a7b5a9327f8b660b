"""The original service README's three client examples, run as written.

The code blocks below are copied verbatim from the original service's README ("Client Usage":
Basic Client Operations, Context Manager, Real-time Monitoring; trailing blanks trimmed for the
linter). The only changes, made by
``adapt`` and checked to apply: the import path (``bluesky_queueserver_api.coordination`` ->
``bs_coordination``), the URL (the test service instead of ``localhost:60620``) and the 60 s
monitoring sleep, shortened. They run as top-level-await code, as in an IPython session.
"""

from __future__ import annotations

import ast
import asyncio
from typing import Any

import pytest

from bs_coordination import DeviceCoordinationClient, LockType

BASIC_CLIENT_OPERATIONS = '''\
from bluesky_queueserver_api.coordination import (
    DeviceCoordinationClient,
    LockType
)

# Create client
async with DeviceCoordinationClient("http://localhost:60620") as client:
    # Request a lock
    response = await client.request_lock(
        device_name="detector1",
        lock_type=LockType.MANUAL_OPERATOR,
        user_id="operator123",
        timeout=300,
        reason="Calibration"
    )

    if response.success:
        print(f"Lock acquired: {response.lock_key}")

        # Perform operations...

        # Release lock
        await client.release_lock("detector1", response.lock_key, "operator123")
'''

CONTEXT_MANAGER = '''\
from bluesky_queueserver_api.coordination import (
    DeviceCoordinationContext,
    DeviceCoordinationClient,
    LockType
)

client = DeviceCoordinationClient("http://localhost:60620")
await client.connect()

# Automatic lock management
async with DeviceCoordinationContext(
    client, "detector1", LockType.MANUAL_OPERATOR, "user123"
) as lock_key:
    # Device is locked here
    print(f"Using device with lock: {lock_key}")
    # Perform operations...
# Device is automatically unlocked here
'''

REAL_TIME_MONITORING = '''\
def on_lock_update(device_name, lock, action):
    print(f"Device {device_name}: {action} - {lock.lock_type}")

client = DeviceCoordinationClient("http://localhost:60620")
await client.connect()

# Add callback for lock updates
client.add_lock_update_callback(on_lock_update)

# Start WebSocket monitoring
await client.start_websocket_monitoring()

# Monitor for some time...
await asyncio.sleep(60)

# Stop monitoring
await client.stop_websocket_monitoring()
await client.disconnect()
'''

#: The shortened "monitor for some time".
MONITOR_SECONDS = 2


def adapt(code: str, url: str) -> str:
    """Apply the allowed changes, each of which must apply."""
    changes = [("http://localhost:60620", url),
               ("bluesky_queueserver_api.coordination", "bs_coordination"),
               ("asyncio.sleep(60)", f"asyncio.sleep({MONITOR_SECONDS})")]
    for old, new in changes:
        if old in code:
            code = code.replace(old, new)
        else:
            assert old in ("bluesky_queueserver_api.coordination", "asyncio.sleep(60)")
    return code


async def run_example(code: str, namespace: dict[str, Any]) -> None:
    """Run a README block as an interactive session would (top-level ``await``)."""
    compiled = compile(code, "<README example>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)
    if asyncio.iscoroutine(result):
        await result


async def events_of(url: str) -> list[tuple[str, str, str, LockType, str | None]]:
    async with DeviceCoordinationClient(url) as c:
        return [(e.action.value, e.device_name, e.lock.user_id, e.lock.lock_type, e.lock.reason)
                for e in (await c.get_events()).events]


async def test_basic_client_operations(live_service: Any,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = adapt(BASIC_CLIENT_OPERATIONS, live_service.url)
    assert "from bs_coordination import" in code
    await run_example(code, {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("Lock acquired: ")
    assert len(out[0]) > len("Lock acquired: ") + 10  # a real key was printed
    assert await events_of(live_service.url) == [
        ("acquired", "detector1", "operator123", LockType.MANUAL_OPERATOR, "Calibration"),
        ("released", "detector1", "operator123", LockType.MANUAL_OPERATOR, "Calibration"),
    ]


async def test_context_manager(live_service: Any, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {}
    try:
        await run_example(adapt(CONTEXT_MANAGER, live_service.url), namespace)
    finally:
        if "client" in namespace:  # the example leaves its client connected
            await namespace["client"].disconnect()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("Using device with lock: ")
    assert out[0] != "Using device with lock: None"
    assert await events_of(live_service.url) == [
        ("acquired", "detector1", "user123", LockType.MANUAL_OPERATOR, None),
        ("released", "detector1", "user123", LockType.MANUAL_OPERATOR, None),
    ]


async def test_real_time_monitoring(live_service: Any,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # What the reader's session already has from the examples above.
    namespace: dict[str, Any] = {"asyncio": asyncio,
                                 "DeviceCoordinationClient": DeviceCoordinationClient}

    async def someone_else_uses_detector1() -> None:
        while not (namespace.get("client") and namespace["client"].monitoring):
            await asyncio.sleep(0.01)
        async with DeviceCoordinationClient(live_service.url) as other:
            granted = await other.request_lock("detector1", LockType.MANUAL_OPERATOR, "bob")
            await other.release_lock("detector1", granted.lock_key, "bob")

    activity = asyncio.create_task(someone_else_uses_detector1())
    try:
        await run_example(adapt(REAL_TIME_MONITORING, live_service.url), namespace)
    finally:
        activity.cancel()
        await asyncio.gather(activity, return_exceptions=True)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith("Device detector1: acquired - ")
    assert out[1].startswith("Device detector1: released - ")
    assert all(line.endswith("MANUAL_OPERATOR") for line in out)
    client = namespace["client"]
    assert not client.monitoring and not client.connected
