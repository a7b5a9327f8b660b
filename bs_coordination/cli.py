"""``bs-coordination``: the operators' command line for the device lock service.

::

    bs-coordination status                       # who holds what (preempted locks indented)
    KEY=$(bs-coordination lock m1 m2 --reason "alignment" --timeout 600)
    bs-coordination renew --key "$KEY"           # the lease now ends 300 s from now
    bs-coordination release --key "$KEY"         # every device of the key
    bs-coordination watch                        # live lock events until Ctrl-C
    bs-coordination watch --count 0              # the current locks, then exit
    bs-coordination preflight --queue            # the devices waiting plans will touch, who holds them

Every subcommand but ``serve`` talks to the service at ``--url`` through the client library
(``DeviceCoordinationClient``: the same requests, the same error texts); it never imports the
service. ``--json`` prints the service's JSON answer instead of a table, for scripts. Exit codes
are listed in ``EXIT_CODES`` (and ``--help``).

This module is the entry point and the parser; the subcommands live in ``bs_coordination._cli``.
A subcommand is registered in ``build_parser`` with ``set_defaults(func=...)``: a coroutine
``func(client, args, out)`` gets a ``DeviceCoordinationClient`` for ``--url``; a plain function
``func(args, out)`` runs as it is. Both return the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import inspect
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO

from bs_coordination._cli._args import join_key_values
from bs_coordination._cli._commands import (
    cmd_devices,
    cmd_force_release,
    cmd_keys_new,
    cmd_lock,
    cmd_release,
    cmd_renew,
    cmd_status,
)
from bs_coordination._cli._errors import (
    EXIT_CODES,
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_FORBIDDEN,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
)
from bs_coordination._cli._preflight import register as register_preflight
from bs_coordination._cli._watch import cmd_watch
from bs_coordination.client import DeviceCoordinationClient
from bs_coordination.epics.cli import register as register_epics
from bs_coordination.models import MIN_LEASE_SECONDS, LockType

DEFAULT_URL = "http://localhost:60620"


def service_url(value: str) -> str:
    """``--url``: ``host:port`` without a scheme means ``http://host:port``."""
    value = value.strip()
    return value if "://" in value else "http://" + value


def lease(value: str) -> float | None:
    """``--timeout``: seconds > 0, or ``none`` for no expiry."""
    if value.strip().lower() in ("none", "never", "0"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds > 0 or 'none', got {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"seconds > 0 or 'none', got {value!r}")
    if seconds < MIN_LEASE_SECONDS:
        raise argparse.ArgumentTypeError(f"a lease is at least {MIN_LEASE_SECONDS:g} s, got {value!r}")
    return seconds


def lock_type(value: str) -> LockType:
    """``--type``: a lock type, case-insensitive (``manual_operator``, ``MAINTENANCE``)."""
    try:
        return LockType(value.strip().upper().replace("-", "_"))
    except ValueError:
        names = ", ".join(t.value for t in LockType)
        raise argparse.ArgumentTypeError(f"one of {names}, got {value!r}") from None


def event_count(value: str) -> int:
    """``watch --count``: a whole number >= 0."""
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"a whole number >= 0, got {value!r}")
    return count


def cmd_serve(argv: Sequence[str]) -> int:
    """Run the service in this process (``python -m bs_coordination.service``)."""
    from bs_coordination.service.__main__ import main as serve_main

    serve_main(list(argv))  # returns when the server stops; bad settings exit(2) inside
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    env = os.environ

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", type=service_url, default=default(env.get("COORDINATION_URL") or DEFAULT_URL),
                        help=f"service URL; host:port means http://host:port [COORDINATION_URL] "
                        f"(default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=default(env.get("COORDINATION_API_KEY") or None),
                        help="API key, sent as 'Authorization: ApiKey ...' [COORDINATION_API_KEY]")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the service's JSON answer instead of a table")
    parser.add_argument("--request-timeout", type=float, default=default(30.0), metavar="SECONDS",
                        help="give up on an HTTP answer after this long (default 30)")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = _Parser(
        prog="bs-coordination",
        description="Operate the bs-coordination device lock service.",
        epilog=EXIT_CODES + "\nenvironment: COORDINATION_URL, COORDINATION_API_KEY, COORDINATION_USER",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, defaults=True)
    # The same options after the subcommand (``status --json``); SUPPRESS keeps the global values.
    common = _Parser(add_help=False)
    _global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("serve", help="run the service here (takes the service's flags: serve --help)",
                   add_help=False)

    p = sub.add_parser("status", parents=[common], help="table of every lock (or of the named devices)")
    p.add_argument("devices", nargs="*", metavar="DEVICE")
    p.set_defaults(func=cmd_status)

    user = env.get("COORDINATION_USER") or _login()
    p = sub.add_parser("lock", parents=[common], help="lock devices (all or none); prints the lock key",
                       epilog="On a conflict the holder is printed on stderr and the exit code is "
                       f"{EXIT_CONFLICT}.")
    p.add_argument("devices", nargs="+", metavar="DEVICE")
    p.add_argument("--type", type=lock_type, default=LockType.MANUAL_OPERATOR,
                   help="MAINTENANCE, QUEUE_EXECUTING, MANUAL_OPERATOR (default) or QUEUE_QUEUED")
    p.add_argument("--reason", help="why: shown to everyone who finds the device taken")
    p.add_argument("--timeout", type=lease, default=300.0, metavar="SECONDS",
                   help="lease in seconds, or 'none' for no expiry (people's locks only; default 300)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="queue for the devices up to this long instead of failing at once")
    p.add_argument("--user", default=user, help=f"who holds it [COORDINATION_USER] (default {user})")
    p.add_argument("--plan-uid", help="plan uid (queue locks)")
    p.add_argument("--key", dest="lock_key", help="an existing key: upgrade it or add devices to it")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("release", parents=[common], help="release the named devices, or every device of the key")
    p.add_argument("devices", nargs="*", metavar="DEVICE")
    p.add_argument("--key", required=True, help="the lock key printed by 'lock'")
    p.add_argument("--user", default=None, help="user id (informational)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("renew", parents=[common],
                       help="set the lease of every lock of a key to end TIMEOUT seconds from now",
                       description="Set the lease of every lock of the key to end --timeout seconds "
                       "from now. This replaces the lease, whatever was left of it: a shorter "
                       "--timeout than the time left shortens it.")
    p.add_argument("--key", required=True, help="the lock key printed by 'lock'")
    p.add_argument("--timeout", type=lease, default=300.0, metavar="SECONDS",
                   help="the lease ends this long from now, or 'none' for no expiry (default 300)")
    p.set_defaults(func=cmd_renew)

    p = sub.add_parser("force-release", parents=[common], help="remove every lock on a device (admin)")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--reason", help="why (recorded in the service log)")
    p.add_argument("--user", default=user, help="who does it, the events' actor; with API keys the "
                   f"key's principal instead [COORDINATION_USER] (default {user})")
    p.set_defaults(func=cmd_force_release)

    p = sub.add_parser("watch", parents=[common], help="print lock events live until Ctrl-C")
    p.add_argument("--count", type=event_count, default=None, metavar="N",
                   help="exit after N events; 0 prints the current locks and exits at once")
    p.add_argument("--quiet", action="store_true", help="do not print the current locks first")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("keys", help="API keys: 'keys new' makes one (for the service's key file)")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION", parser_class=_Parser)
    p = keys.add_parser("new", parents=[common], help="make a key; print it and its key-file entry")
    p.add_argument("--principal", required=True, help="who the key is for (becomes user_id of its locks)")
    p.add_argument("--role", action="append", required=True,
                   help="read, operator, queue or admin (repeat for several)")
    p.set_defaults(func=cmd_keys_new)

    p = sub.add_parser("devices", parents=[common], help="devices the service discovered in its profile collection")
    p.add_argument("--device-type", help="only this type: motor, detector, signal, flyer, device")
    p.set_defaults(func=cmd_devices)

    register_epics(sub, common)  # epics-bridge, epics-acf (bs_coordination/epics/cli.py)
    register_preflight(sub, common)  # preflight (bs_coordination/_cli/_preflight.py)
    return parser


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "operator"


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """While a command runs, what the library warns about (e.g. a WebSocket reconnecting)
    goes to stderr as ``bs-coordination: ...``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("bs-coordination: %(message)s"))
    logger = logging.getLogger("bs_coordination")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


async def _with_client(args: argparse.Namespace, out: TextIO) -> int:
    client = DeviceCoordinationClient(args.url, timeout=args.request_timeout, api_key=args.api_key)
    try:
        code: int = await args.func(client, args, out)
        return code
    finally:
        await client.disconnect()


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the parsed subcommand; ``CliError`` ends it with its code."""
    if inspect.iscoroutinefunction(args.func):
        with _warnings_to_stderr():
            return asyncio.run(_with_client(args, out))
    code: int = args.func(args, out)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bs-coordination`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return cmd_serve(argv[1:])
    args = build_parser().parse_args(join_key_values(argv))
    out = sys.stdout
    try:
        code = run_command(args, out)
    except CliError as exc:
        sys.stderr.write(f"bs-coordination: {exc.message}\n")
        return exc.code
    except KeyboardInterrupt:
        # Ctrl-C ends ``watch`` normally; any other command was interrupted.
        return EXIT_OK if args.command == "watch" else 130
    with contextlib.suppress(Exception):
        out.flush()
    return code


__all__ = [
    "DEFAULT_URL",
    "EXIT_CODES",
    "EXIT_CONFLICT",
    "EXIT_ERROR",
    "EXIT_FORBIDDEN",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "build_parser",
    "main",
]


if __name__ == "__main__":
    raise SystemExit(main())
