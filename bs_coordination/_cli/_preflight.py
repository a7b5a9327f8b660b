"""``bs-coordination preflight``: which devices queue items will touch, and who holds them now.

::

    bs-coordination preflight '{"name": "scan", "args": [["det1"], "motor1", -1, 1, 5]}'
    bs-coordination preflight --queue          # every plan waiting in the queue server's queue

Each item is dry-run by the service (``POST /api/preflight``, through the client library);
the command prints its devices (``argument``: named in the item; ``dry run``: found only by the
dry run) and every lock in its way (who holds it, the lock type, why, since and until when).
Exit code 2 when any item would be blocked (the CLI's conflict code), 1 when an item could not
be checked (the service or the queue server failed), 64 for an item the service refused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from typing import Any, TextIO

from bs_coordination._cli._errors import (
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    cli_error,
    exit_code_of,
)
from bs_coordination._cli._format import LOCK_HEADERS, print_json, show_time, show_until, table
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import CoordinationError, ServiceError

#: The RE Manager's default control address (bluesky-queueserver-api's own default).
DEFAULT_ZMQ_CONTROL_ADDR = "tcp://localhost:60615"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``preflight`` to the subcommands of ``bs-coordination``."""
    p = sub.add_parser(
        "preflight", parents=[common],
        help="dry-run queue items: the devices they will touch and the locks in their way",
        description="Dry-run a queue item (JSON, as the queue server writes it) or every plan "
        "waiting in a queue server's queue (--queue) on the service, and print the devices "
        "each will touch and the locks that would block it (MAINTENANCE, or another plan "
        f"running). Exit code {EXIT_CONFLICT} when any item would be blocked.")
    p.add_argument("item", nargs="?", metavar="ITEM_JSON",
                   help='a plan item: \'{"name": "count", "args": [["det1"]], "kwargs": {}}\'')
    p.add_argument("--queue", action="store_true",
                   help="every plan waiting in the queue server's queue (bluesky-queueserver-api)")
    p.add_argument("--zmq-control-addr",
                   default=os.environ.get("QSERVER_ZMQ_CONTROL_ADDRESS") or DEFAULT_ZMQ_CONTROL_ADDR,
                   help="the RE Manager's control address [QSERVER_ZMQ_CONTROL_ADDRESS] "
                   f"(default {DEFAULT_ZMQ_CONTROL_ADDR})")
    p.set_defaults(func=cmd_preflight)


def parse_item(text: str) -> dict[str, Any]:
    """An item from the command line: ``{"name": ...}`` or ``{"item": {"name": ...}}``."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(f"preflight: ITEM_JSON is not JSON: {exc}", EXIT_USAGE) from None
    if isinstance(value, dict) and isinstance(value.get("item"), dict):
        value = value["item"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise CliError('preflight: ITEM_JSON must be an object with a plan "name" '
                       '(and "args", "kwargs")', EXIT_USAGE)
    return value


async def queue_items(addr: str) -> list[dict[str, Any]]:
    """The plan items waiting in the RE Manager's queue, in queue order."""
    try:
        from bluesky_queueserver_api.zmq.aio import REManagerAPI
    except ImportError:
        raise CliError("preflight --queue needs bluesky-queueserver-api: "
                       "pip install 'bs-coordination[queueserver]'", EXIT_ERROR) from None
    manager = REManagerAPI(zmq_control_addr=addr)
    try:
        queue = await manager.queue_get()
    except Exception as exc:
        raise CliError(f"preflight --queue: the queue server at {addr} did not answer: "
                       f"{type(exc).__name__}: {exc}", EXIT_ERROR) from None
    finally:
        await manager.close()
    items = queue.get("items") or []
    return [i for i in items if isinstance(i, dict) and i.get("item_type", "plan") == "plan"]


def _title(item: dict[str, Any]) -> str:
    args = ", ".join(json.dumps(a) for a in item.get("args") or [])
    kwargs = ", ".join(f"{k}={json.dumps(v)}" for k, v in (item.get("kwargs") or {}).items())
    call = f"{item.get('name')}({', '.join(p for p in (args, kwargs) if p)})"
    uid = item.get("item_uid")
    return f"{call}  [item {uid}]" if uid else call


def print_answer(item: dict[str, Any], answer: dict[str, Any], out: TextIO) -> None:
    """One item: verdict, devices, why the dry run is incomplete, the locks in its way."""
    verdict = "can start" if answer.get("can_start") else "BLOCKED"
    out.write(f"{_title(item)}: {verdict}\n")
    devices = [f"{d['device_name']} ({str(d.get('source', '?')).replace('_', ' ')})"
               for d in answer.get("devices") or []]
    out.write(f"  devices: {', '.join(devices) or 'none'}\n")
    if not answer.get("complete"):
        out.write(f"  dry run incomplete: {answer.get('reason')} (the devices above may not be "
                  "all)\n")
    conflicts = answer.get("conflicts") or []
    if conflicts:
        rows = []
        for c in conflicts:
            lock = c.get("lock") or {}
            rows.append([str(lock.get("device_name")), str(lock.get("lock_type")),
                         str(lock.get("user_id")), str(lock.get("reason") or ""),
                         show_time(lock.get("acquired_at")), show_until(lock.get("expires_at"))])
        out.write("  in the way:\n")
        text = io.StringIO()
        table(rows, LOCK_HEADERS, text)
        out.write("".join("    " + line for line in text.getvalue().splitlines(keepends=True)))


async def cmd_preflight(client: DeviceCoordinationClient, args: argparse.Namespace,
                        out: TextIO) -> int:
    """``preflight ITEM_JSON`` or ``preflight --queue``."""
    if bool(args.item) == bool(args.queue):
        raise CliError("preflight: give either ITEM_JSON or --queue", EXIT_USAGE)
    if args.queue:
        items = await queue_items(args.zmq_control_addr)
        if not items:
            if args.json:
                print_json([], out)
            else:
                out.write("no plans are waiting in the queue\n")
            return EXIT_OK
    else:
        items = [parse_item(args.item)]
    answers: list[dict[str, Any]] = []
    failed = 0
    for item in items:
        try:
            answer = await client.preflight(item)
        except ServiceError as exc:
            if exc.status_code == 409:  # no profile collection: nothing can be dry-run
                raise CliError(f"preflight: {exc.message}", EXIT_ERROR) from None
            raise cli_error(exc, "preflight") from None
        except CoordinationError as exc:
            if not args.queue:
                raise cli_error(exc, f"preflight of {item.get('name')!r}") from None
            failed = max(failed, exit_code_of(exc))
            answers.append({"item": item, "error": exc.message})
            if not args.json:
                out.write(f"{_title(item)}: cannot be checked: {exc.message}\n")
            continue
        answers.append({"item": item, **answer})
        if not args.json:
            print_answer(item, answer, out)
    if args.json:
        print_json(answers if args.queue else answers[0], out)
    if any(a.get("conflicts") for a in answers):
        return EXIT_CONFLICT
    return EXIT_ERROR if failed else EXIT_OK
