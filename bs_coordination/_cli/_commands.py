"""The subcommands that ask the service once: ``status``, ``lock``, ``release``, ``renew``,
``force-release``, ``devices``, and ``keys new`` (which asks nothing).

Each is a coroutine ``(client, args, out) -> exit code`` built on ``DeviceCoordinationClient``,
so the command line sends what the library sends and says what the library says. ``--json``
prints the service's answer; errors end as ``CliError`` with the code of ``_errors``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from bs_coordination._cli._errors import (
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    cli_error,
)
from bs_coordination._cli._format import (
    LOCK_HEADERS,
    as_json,
    holder_line,
    lock_rows,
    print_json,
    show_until,
    table,
)
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.errors import CoordinationError, LockNotFoundError


async def cmd_status(client: DeviceCoordinationClient, args: argparse.Namespace, out: TextIO) -> int:
    """``status [DEVICE...]``: every lock as a table, or what holds the named devices."""
    locks: list[dict[str, Any]] = []
    free: list[str] = []
    if args.devices:
        answers = []
        for device in args.devices:
            try:
                answers.append(as_json(await client.get_lock_status(device)))
            except CoordinationError as exc:
                raise cli_error(exc, f"status of {device}") from None
        if args.json:
            print_json(answers[0] if len(answers) == 1 else answers, out)
            return EXIT_OK
        for a in answers:
            for lk in [a.get("lock"), *a.get("preempted", []), *a.get("component_locks", [])]:
                if lk and lk not in locks:
                    locks.append(lk)
        free = [a["device_name"] for a in answers if not a.get("locked") and not a.get("component_locks")]
    else:
        try:
            answer = as_json(await client.get_all_locks())
        except CoordinationError as exc:
            raise cli_error(exc, "status") from None
        if args.json:
            print_json(answer, out)
            return EXIT_OK
        locks = answer.get("locks", [])
    if locks:
        table(lock_rows(locks), LOCK_HEADERS, out)
    elif not free:
        out.write("no locks held\n")
    for name in free:
        out.write(f"{name}: free\n")
    return EXIT_OK


async def cmd_lock(client: DeviceCoordinationClient, args: argparse.Namespace, out: TextIO) -> int:
    """``lock DEVICE...``: all the devices under one key (printed), or exit 2 naming the holder."""
    options: dict[str, Any] = {
        "timeout": args.timeout, "reason": args.reason or None, "plan_uid": args.plan_uid or None,
        "wait": args.wait or 0.0, "lock_key": args.lock_key or None}
    try:
        if len(args.devices) == 1:
            answer = await client.request_lock(args.devices[0], args.type, args.user, **options)
        else:
            answer = await client.request_locks(args.devices, args.type, args.user, **options)
    except CoordinationError as exc:
        raise cli_error(exc, "lock") from None
    body = as_json(answer)
    if answer.success:
        if args.json:
            print_json(body, out)
        else:
            out.write(f"{answer.lock_key}\n")
        return EXIT_OK
    if args.json:
        print_json(body, out)
    lines = [holder_line(c) for c in body.get("conflicts", [])] or [answer.message]
    raise CliError("refused: " + "\n  ".join(lines), EXIT_CONFLICT, body)


async def cmd_release(client: DeviceCoordinationClient, args: argparse.Namespace, out: TextIO) -> int:
    """``release [DEVICE...] --key KEY``: the named devices, or every device of the key."""
    targets: list[str | None] = list(args.devices) or [None]
    answers = []
    for device in targets:
        try:
            answers.append(await client.release_lock(device, args.key, args.user))
        except CoordinationError as exc:
            raise cli_error(exc, f"release {device}" if device else "release") from None
    if args.json:
        print_json(answers[0] if len(answers) == 1 else answers, out)
        return EXIT_OK
    released = [lk.get("device_name") for a in answers for lk in a.get("released", [])]
    out.write(f"released {', '.join(released)}\n" if released else "released\n")
    return EXIT_OK


async def cmd_renew(client: DeviceCoordinationClient, args: argparse.Namespace, out: TextIO) -> int:
    """``renew --key KEY``: every lock of the key now ends ``--timeout`` seconds from now."""
    try:
        answer = as_json(await client.renew_lock(args.key, args.timeout))
    except CoordinationError as exc:
        raise cli_error(exc, "renew") from None
    if args.json:
        print_json(answer, out)
        return EXIT_OK
    names = ", ".join(lk.get("device_name", "?") for lk in answer.get("locks", []))
    out.write(f"renewed {names or 'the lock'} until {show_until(answer.get('expires_at'))}\n")
    return EXIT_OK


async def cmd_force_release(client: DeviceCoordinationClient, args: argparse.Namespace,
                            out: TextIO) -> int:
    """``force-release DEVICE``: every lock on exactly that name (admin)."""
    try:
        answer = as_json(await client.force_release(args.device, args.reason or None,
                                                    args.user or None))
    except CoordinationError as exc:
        raise cli_error(exc, f"force-release {args.device}") from None
    if args.json:
        print_json(answer, out)
        return EXIT_OK
    gone = answer.get("released", [])
    if not gone:
        out.write(f"{args.device}: no lock to release\n")
    for lk in gone:
        out.write(f"force-released {lk.get('device_name')} from {lk.get('user_id')} ({lk.get('lock_type')})\n")
    return EXIT_OK


async def cmd_devices(client: DeviceCoordinationClient, args: argparse.Namespace, out: TextIO) -> int:
    """``devices``: what the service discovered in its profile collection."""
    try:
        answer = await client.get_devices(args.device_type or None)
    except LockNotFoundError as exc:
        raise CliError(f"the service at {client.base_url} has no device discovery (/api/device-config): "
                       "it predates it, or is not a bs-coordination service; a service discovers "
                       "devices when started with --profile-collection", EXIT_NOT_FOUND) from exc
    except CoordinationError as exc:
        raise cli_error(exc, "devices") from None
    if args.json:
        print_json(answer, out)
        return EXIT_OK
    devices = answer.get("devices", [])
    if isinstance(devices, dict):  # {name: {...}} form
        devices = [{"name": k, **v} for k, v in devices.items()]
    if not devices:
        out.write(await no_devices_reason(client) + "\n")
        return EXIT_OK
    rows = [[str(d.get("name", "")), str(d.get("device_type", "")), str(d.get("device_class", "")),
             str(d.get("module", "") or "")] for d in devices]
    table(sorted(rows), ["NAME", "TYPE", "CLASS", "MODULE"], out)
    return EXIT_OK


async def no_devices_reason(client: DeviceCoordinationClient) -> str:
    """Why the device list is empty, from ``/api/device-config/status`` when it says."""
    try:
        info = await client.get_device_config_status()
    except CoordinationError:
        info = {}
    if info.get("configured"):
        if info.get("last_error"):
            return f"no devices: loading the profile collection {info.get('path')} failed: {info['last_error']}"
        if not info.get("ready"):
            return f"no devices yet: the profile collection {info.get('path')} is still loading"
        return f"no devices: the profile collection {info.get('path')} defines none"
    return ("no devices: the service discovers devices only when started with "
            "--profile-collection (COORDINATION_PROFILE_COLLECTION)")


def cmd_keys_new(args: argparse.Namespace, out: TextIO) -> int:
    """Make an API key and print it with its key-file entry (which holds only its hash)."""
    # The key format and the file entry are defined once, in bs_coordination.apikeys.
    from bs_coordination.apikeys import KeyFileError, check_principal, key_entry, new_api_key, parse_roles

    try:
        check_principal(args.principal)
        roles = sorted(r.value for r in parse_roles(args.role))
    except KeyFileError as exc:
        raise CliError(f"keys new: {exc}", EXIT_USAGE) from None
    key = new_api_key()
    entry = key_entry(args.principal, roles, key)
    if args.json:
        print_json({"api_key": key, "entry": entry}, out)
        return EXIT_OK
    out.write(f"API key for {args.principal} (shown only now; the service keeps only its hash):\n"
              f"  {key}\n"
              "Add this entry to the api_keys list of the key file (--api-keys / COORDINATION_API_KEYS):\n"
              f"  {json.dumps(entry)}\n")
    return EXIT_OK
