"""The ``epics-bridge`` and ``epics-acf`` subcommands of ``bs-coordination``.

::

    bs-coordination epics-bridge --url http://coord:60620 --prefix BL:LOCKS: --device m1 --device m2
    bs-coordination epics-acf --prefix BL:LOCKS: --device m1=XF:31ID{Mtr:1} \\
        --queue-user queue_server --operator-user alice --maintenance-user bob --output coord.acf

``register(subparsers, common)`` adds both to the ``bs-coordination`` parser; nothing here
imports caproto until the bridge runs, so the rest of the command line works without the
``epics`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from bs_coordination._cli._errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, CliError, cli_error
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.epics.acf import Accounts, check_record_name, records_from_discovery, render_acf
from bs_coordination.epics.pvnames import check_epics_device_name, check_prefix
from bs_coordination.errors import CoordinationError

log = logging.getLogger(__name__)

#: The bridge's WebSocket ping interval and longest reconnect wait (seconds): a silent
#: network loss is noticed, and a service that is back is followed, within about this long.
BRIDGE_HEARTBEAT = 2.0
BRIDGE_MAX_RECONNECT_DELAY = 2.0

DEFAULT_PREFIX = os.environ.get("COORDINATION_EPICS_PREFIX", "")

ACF_EPILOG = """\
rules (one ASG per device, named after it, INPA = <prefix><device>:LOCK):
  LOCK -1 free or 3 QUEUE_QUEUED: operators and queue accounts write
  LOCK 1 QUEUE_EXECUTING: queue accounts only;  LOCK 2 MANUAL_OPERATOR: operators only
  LOCK 0 MAINTENANCE: maintenance staff only;  maintenance staff may always write (no CALC),
  so a dead bridge (LOCK INVALID) locks out everyone else but never them; reads are never
  restricted. --queue-host/--operator-host/--maintenance-host restrict a role to those
  client host names (HAG).
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``epics-bridge`` and ``epics-acf`` to the subparsers ``sub`` of ``bs-coordination``
    (``common``: the parent parser with ``--url``, ``--api-key``...)."""
    p = sub.add_parser(
        "epics-bridge", parents=[common],
        help="serve the lock table as EPICS Channel Access PVs for IOC access security",
        description="Serve <prefix><device>:LOCK (active lock's priority, -1 free) and "
        "<prefix><device>:HOLDER (holder's user id) over Channel Access, in step with the "
        "service's events; every :LOCK goes INVALID while the service is lost. Ports and "
        "interfaces come from the standard variables (EPICS_CA_SERVER_PORT, "
        "EPICS_CAS_INTF_ADDR_LIST, EPICS_CAS_BEACON_ADDR_LIST...). Runs until Ctrl-C/SIGTERM.")
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help="PV name prefix, e.g. 'BL:LOCKS:' [COORDINATION_EPICS_PREFIX]")
    p.add_argument("--device", action="append", default=[], metavar="NAME", dest="devices",
                   help="a device to serve (repeatable; default: every device the service "
                   "discovered)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")
    p.set_defaults(func=cmd_epics_bridge)

    p = sub.add_parser(
        "epics-acf", parents=[common],
        help="write the EPICS access-security file (ACF) that enforces the locks at the IOC",
        epilog=ACF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help="the bridge's PV name prefix [COORDINATION_EPICS_PREFIX]")
    p.add_argument("--device", action="append", default=[], metavar="NAME=RECORD[,RECORD]",
                   dest="devices", help="a device and its records (repeatable; default: the "
                   "devices the service discovered, with the records of their EPICS write PVs)")
    for role, what in (("queue", "queue (RunEngine) accounts"), ("operator", "operators"),
                       ("maintenance", "maintenance staff")):
        p.add_argument(f"--{role}-user", action="append", default=[], metavar="USER",
                       help=f"Channel Access user name of {what} (repeatable)")
        p.add_argument(f"--{role}-host", action="append", default=[], metavar="HOST",
                       help=f"restrict {what} to these client hosts (repeatable; default any)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the file here (default stdout)")
    p.set_defaults(func=cmd_epics_acf)


# -- epics-acf --------------------------------------------------------------------------------
def parse_device_records(specs: list[str]) -> dict[str, list[str]]:
    """``["m1=REC1,REC2", "m2=REC3"]`` -> ``{"m1": ["REC1", "REC2"], ...}``; ``CliError``
    naming a bad entry."""
    devices: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, records = spec.partition("=")
        names = [r.strip() for r in records.split(",") if r.strip()]
        if not sep or not name.strip() or not names:
            raise CliError(f"--device {spec!r}: expected NAME=RECORD[,RECORD...]", EXIT_USAGE)
        try:
            check_epics_device_name(name.strip())
            for record in names:
                check_record_name(record)
        except ValueError as exc:
            raise CliError(f"--device {spec!r}: {exc}", EXIT_USAGE) from None
        devices.setdefault(name.strip(), []).extend(names)
    return devices


async def cmd_epics_acf(client: DeviceCoordinationClient, args: argparse.Namespace,
                        out: TextIO) -> int:
    """``epics-acf``: write the access-security file."""
    accounts = Accounts(queue=args.queue_user, operators=args.operator_user,
                        maintenance=args.maintenance_user, queue_hosts=args.queue_host,
                        operator_hosts=args.operator_host, maintenance_hosts=args.maintenance_host)
    try:
        accounts.check()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.devices:
        devices = parse_device_records(args.devices)
    else:
        devices = records_from_discovery(await _discovered(client))
        if not devices:
            raise CliError(f"the service at {client.base_url} knows no device with EPICS write "
                           "PVs: give --device NAME=RECORD[,RECORD]", EXIT_USAGE)
    try:
        text = render_acf(devices, args.prefix, accounts)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc}", EXIT_ERROR) from None
    else:
        out.write(text)
    return EXIT_OK


async def _discovered(client: DeviceCoordinationClient) -> list[dict[str, Any]]:
    try:
        answer = await client.get_devices()
    except CoordinationError as exc:
        raise cli_error(exc, "device list") from None
    devices = answer.get("devices", []) if isinstance(answer, dict) else []
    if isinstance(devices, dict):  # {name: {...}} form
        devices = [{"name": k, **v} for k, v in devices.items()]
    return [d for d in devices if isinstance(d, dict)]


# -- epics-bridge -----------------------------------------------------------------------------
def cmd_epics_bridge(args: argparse.Namespace, out: TextIO) -> int:
    """``epics-bridge``: serve the lock PVs until Ctrl-C or SIGTERM."""
    try:
        check_prefix(args.prefix)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    try:
        for device in args.devices:
            check_epics_device_name(device)
    except ValueError as exc:
        raise CliError(f"--device: {exc}", EXIT_USAGE) from None
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        raise CliError(f"--log-level {args.log_level!r}: DEBUG, INFO, WARNING or ERROR", EXIT_USAGE)
    try:
        from bs_coordination.epics.bridge import EpicsBridge, LockPVs
    except ImportError as exc:
        raise CliError(f"epics-bridge needs caproto ({exc}): pip install 'bs-coordination[epics]'",
                       EXIT_ERROR) from None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("bs_coordination")
    root.addHandler(handler)
    root.setLevel(level)

    async def run() -> int:
        client = DeviceCoordinationClient(args.url, timeout=args.request_timeout,
                                          api_key=args.api_key, heartbeat=BRIDGE_HEARTBEAT,
                                          max_reconnect_delay=BRIDGE_MAX_RECONNECT_DELAY)
        try:
            devices = list(args.devices)
            if not devices:
                devices = [str(d["name"]) for d in await _discovered(client)
                           if "." not in str(d.get("name", "."))]
                if not devices:
                    raise CliError(f"the service at {client.base_url} discovered no devices: "
                                   "give --device NAME", EXIT_USAGE)
            try:
                pvs = LockPVs(args.prefix, devices)
            except ValueError as exc:
                raise CliError(str(exc), EXIT_USAGE) from None
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, task.cancel if task else lambda: None)
            with contextlib.suppress(asyncio.CancelledError):
                await EpicsBridge(client, pvs).run()
            log.info("epics-bridge stopped")
            return EXIT_OK
        finally:
            await client.disconnect()

    try:
        return asyncio.run(run())
    finally:
        root.removeHandler(handler)


__all__ = ["cmd_epics_acf", "cmd_epics_bridge", "parse_device_records", "register"]
