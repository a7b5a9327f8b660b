"""``bs-coordination watch``: the current locks, then each lock event as it happens.

Built on the client library's WebSocket monitoring, which reconnects by itself and resumes
after the last event it delivered (``?since=``), so no event is lost or printed twice across a
lost connection; what it says while reconnecting reaches stderr through logging.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any, TextIO

from bs_coordination._cli._errors import EXIT_OK, cli_error
from bs_coordination._cli._format import event_line, print_locks
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import CoordinationError
from bs_coordination.models import DeviceLock

WATCHING = "-- watching lock events (Ctrl-C to stop) --"


class _Printer:
    """Prints what the monitor hands over, in order: the current locks (from the status
    callback: the whole table, however many messages it came in) and the events (from the
    message callback, as the service sent them); counts the events."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.events = 0
        self.statuses = 0
        #: Set when ``--count`` events were printed (or at once after the status for 0).
        self.done = asyncio.Event()

    def on_status(self, locks: list[DeviceLock]) -> None:
        self.statuses += 1
        if not self.args.json and self.statuses == 1 and not self.args.quiet:
            print_locks([lock.model_dump(mode="json") for lock in locks], self.out)
            if self.args.count != 0:
                self.out.write(WATCHING + "\n")
        self._flush()

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "initial_status":
            if self.args.json:
                self.out.write(json.dumps(message) + "\n")
        elif kind == "lock_update":
            if self.done.is_set():
                return
            self.events += 1
            self.out.write((json.dumps(message) if self.args.json else event_line(message)) + "\n")
        self._flush()

    def _flush(self) -> None:
        self.out.flush()
        if self.args.count is not None and self.events >= self.args.count:
            self.done.set()


async def cmd_watch(client: DeviceCoordinationClient, args: argparse.Namespace, out: TextIO) -> int:
    """Print lock events until interrupted, or until ``--count`` events (0: only the current
    locks, then exit)."""
    printer = _Printer(args, out)
    client.add_status_callback(printer.on_status)
    client.add_message_callback(printer.on_message)
    try:
        try:
            await client.start_websocket_monitoring()
        except CoordinationError as exc:
            raise cli_error(exc, "watch") from None
        await printer.done.wait()
    finally:
        await client.stop_websocket_monitoring()
    return EXIT_OK
