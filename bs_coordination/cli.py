"""``bs-coordination``: the operators' command line for the device lock service.

::

    bs-coordination status                       # who holds what (preempted locks indented)
    KEY=$(bs-coordination lock m1 m2 --reason "alignment" --timeout 600)
    bs-coordination renew --key "$KEY"
    bs-coordination release --key "$KEY"         # every device of the key
    bs-coordination watch                        # live lock events until Ctrl-C

Every subcommand but ``serve`` talks plain HTTP (and, for ``watch``, the WebSocket) to the
service at ``--url``; it never imports the service. ``--json`` prints the service's JSON answer
instead of a table, for scripts. Exit codes are listed in ``EXIT_CODES`` (and ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn, TextIO

from bs_coordination.models import LockType, names_overlap

DEFAULT_URL = "http://localhost:60620"

EXIT_OK = 0
#: The service could not be reached, answered 5xx (e.g. its store is down), or anything else.
EXIT_ERROR = 1
#: The device is held by someone of equal or higher priority (HTTP 409).
EXIT_CONFLICT = 2
#: The key holds nothing (on that device), or no such device/route (HTTP 404).
EXIT_NOT_FOUND = 3
#: The device is locked under another key, or the API key lacks the role / is missing (403, 401).
EXIT_FORBIDDEN = 4
#: Bad command line, or a request the service refused as invalid (HTTP 4xx other than the above).
EXIT_USAGE = 64

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}   success
  {EXIT_ERROR}   error: the service is unreachable or failed (5xx, e.g. its store is down)
  {EXIT_CONFLICT}   conflict: the device is held by someone else (the holder is printed on stderr)
  {EXIT_NOT_FOUND}   not found: the key holds nothing there, or the service lacks the endpoint
  {EXIT_FORBIDDEN}   forbidden: locked under another key, or the API key is missing or lacks the role
  {EXIT_USAGE}  usage: bad arguments, or the service refused the request as invalid (422)
"""

_STATUS_EXIT = {409: EXIT_CONFLICT, 404: EXIT_NOT_FOUND, 403: EXIT_FORBIDDEN, 401: EXIT_FORBIDDEN}


class CliError(Exception):
    """Ends the command with ``code`` after printing ``message`` on stderr."""

    def __init__(self, message: str, code: int = EXIT_ERROR, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.body = body


# -- HTTP ------------------------------------------------------------------------------------
class Http:
    """Synchronous JSON over HTTP with the standard library (one request per call)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        # Never route a control-room service through an environment proxy (aiohttp does not either).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"ApiKey {self.api_key}"
        return headers

    def call(self, method: str, path: str, body: Any = None, *, extra_time: float = 0.0) -> tuple[int, Any]:
        """``(status, parsed JSON or text)``; ``CliError`` if no answer came."""
        data = None
        headers = self.headers()
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout + extra_time) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the coordination service at {self.url}: {reason}") from None
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def ok(self, method: str, path: str, body: Any = None, *, what: str, extra_time: float = 0.0) -> Any:
        """The body of a 2xx answer; ``CliError`` with the matching exit code otherwise."""
        status, answer = self.call(method, path, body, extra_time=extra_time)
        if 200 <= status < 300:
            return answer
        raise CliError(f"{what}: {message_of(status, answer)}", exit_code_for(status), answer)


def exit_code_for(status: int) -> int:
    if status in _STATUS_EXIT:
        return _STATUS_EXIT[status]
    if 400 <= status < 500:
        return EXIT_USAGE
    return EXIT_ERROR


def message_of(status: int, body: Any) -> str:
    """The human message of an error answer, whatever its shape."""
    if isinstance(body, dict):
        if isinstance(body.get("message"), str) and body["message"]:
            return body["message"]
        if isinstance(body.get("detail"), str):
            return body["detail"]
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return f"HTTP {status}"


# -- formatting ------------------------------------------------------------------------------
def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def duration(seconds: float) -> str:
    """``4m05s``, ``2h03m``, ``3d04h``: short and exact enough for a countdown."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def show_time(value: Any, now: datetime | None = None) -> str:
    """Local time; the date only when it is not today."""
    t = parse_time(value)
    if t is None:
        return "-"
    local = t.astimezone()
    today = (now or datetime.now(timezone.utc)).astimezone().date()
    return local.strftime("%H:%M:%S" if local.date() == today else "%Y-%m-%d %H:%M:%S")


def show_until(value: Any, now: datetime | None = None) -> str:
    t = parse_time(value)
    if t is None:
        return "no expiry"
    now = now or datetime.now(timezone.utc)
    return f"{show_time(value, now)} (in {duration((t - now).total_seconds())})"


def holder_line(lock: dict[str, Any]) -> str:
    """``m1 held by alice (MANUAL_OPERATOR) since 12:00:01, until 12:05:01 (in 4m59s): why``."""
    reason = f": {lock['reason']}" if lock.get("reason") else ""
    plan = f" plan {lock['plan_uid']}" if lock.get("plan_uid") else ""
    return (f"{lock.get('device_name')} held by {lock.get('user_id')} ({lock.get('lock_type')}{plan}) "
            f"since {show_time(lock.get('acquired_at'))}, until {show_until(lock.get('expires_at'))}{reason}")


def table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() + "\n")


def lock_rows(locks: list[dict[str, Any]]) -> list[list[str]]:
    """Active locks by device name, each followed by the preempted locks waiting under it."""
    active = sorted((lk for lk in locks if lk.get("state", "active") == "active"),
                    key=lambda lk: lk.get("device_name", ""))
    waiting = sorted((lk for lk in locks if lk.get("state") == "preempted"),
                     key=lambda lk: (lk.get("device_name", ""), lk.get("priority", 0)))
    rows: list[list[str]] = []

    def row(lock: dict[str, Any], under: bool) -> list[str]:
        name = lock.get("device_name", "?")
        return [f"  └ {name}" if under else name,
                f"{lock.get('lock_type')} (preempted)" if under else str(lock.get("lock_type")),
                str(lock.get("user_id", "")), str(lock.get("reason") or ""),
                show_time(lock.get("acquired_at")), show_until(lock.get("expires_at"))]

    for lock in active:
        rows.append(row(lock, False))
        for w in [w for w in waiting if names_overlap(w.get("device_name", ""), lock.get("device_name", ""))]:
            waiting.remove(w)
            rows.append(row(w, True))
    rows.extend(row(w, True) for w in waiting)  # only if its preemptor vanished meanwhile
    return rows


LOCK_HEADERS = ["DEVICE", "TYPE", "HOLDER", "REASON", "SINCE", "UNTIL"]


def print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


# -- subcommands -----------------------------------------------------------------------------
def cmd_status(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    if args.devices:
        answers = [http.ok("GET", "/api/locks/device/" + urllib.parse.quote(d, safe=""),
                           what=f"status of {d}") for d in args.devices]
        if args.json:
            print_json(answers[0] if len(answers) == 1 else answers, out)
            return EXIT_OK
        locks: list[dict[str, Any]] = []
        for a in answers:
            for lk in [a.get("lock"), *a.get("preempted", []), *a.get("component_locks", [])]:
                if lk and lk not in locks:
                    locks.append(lk)
        free = [a["device_name"] for a in answers if not a.get("locked") and not a.get("component_locks")]
    else:
        answer = http.ok("GET", "/api/locks/status", what="status")
        if args.json:
            print_json(answer, out)
            return EXIT_OK
        locks, free = answer.get("locks", []), []
    if locks:
        table(lock_rows(locks), LOCK_HEADERS, out)
    elif not free:
        out.write("no locks held\n")
    for name in free:
        out.write(f"{name}: free\n")
    return EXIT_OK


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
    return seconds


def lock_type(value: str) -> LockType:
    """``--type``: a lock type, case-insensitive (``manual_operator``, ``MAINTENANCE``)."""
    try:
        return LockType(value.strip().upper().replace("-", "_"))
    except ValueError:
        names = ", ".join(t.value for t in LockType)
        raise argparse.ArgumentTypeError(f"one of {names}, got {value!r}") from None


def cmd_lock(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {"lock_type": args.type.value, "user_id": args.user, "timeout": args.timeout}
    if len(args.devices) == 1:
        body["device_name"] = args.devices[0]
    else:
        body["device_names"] = args.devices
    for name in ("reason", "plan_uid", "lock_key"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    if args.wait:
        body["wait"] = args.wait
    status, answer = http.call("POST", "/api/lock/request", body, extra_time=args.wait or 0.0)
    if 200 <= status < 300 and isinstance(answer, dict) and answer.get("success", True):
        if args.json:
            print_json(answer, out)
        else:
            out.write(f"{answer['lock_key']}\n")
        return EXIT_OK
    if status == 409 or (isinstance(answer, dict) and answer.get("success") is False and status < 300):
        if args.json:
            print_json(answer, out)
        conflicts = answer.get("conflicts", []) if isinstance(answer, dict) else []
        lines = [holder_line(c) for c in conflicts] or [message_of(status, answer)]
        raise CliError("refused: " + "\n  ".join(lines), EXIT_CONFLICT, answer)
    raise CliError(f"lock: {message_of(status, answer)}", exit_code_for(status), answer)


def cmd_release(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    targets: list[str | None] = list(args.devices) or [None]
    answers = []
    for device in targets:
        body: dict[str, Any] = {"lock_key": args.key}
        if device is not None:
            body["device_name"] = device
        if args.user:
            body["user_id"] = args.user
        answers.append(http.ok("POST", "/api/lock/release", body,
                               what=f"release {device}" if device else "release"))
    if args.json:
        print_json(answers[0] if len(answers) == 1 else answers, out)
        return EXIT_OK
    released = [lk.get("device_name") for a in answers for lk in a.get("released", [])]
    out.write(f"released {', '.join(released)}\n" if released else "released\n")
    return EXIT_OK


def cmd_renew(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    answer = http.ok("POST", "/api/lock/renew", {"lock_key": args.key, "timeout": args.timeout}, what="renew")
    if args.json:
        print_json(answer, out)
        return EXIT_OK
    names = ", ".join(lk.get("device_name", "?") for lk in answer.get("locks", []))
    out.write(f"renewed {names or 'the lock'} until {show_until(answer.get('expires_at'))}\n")
    return EXIT_OK


def cmd_force_release(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {"device_name": args.device}
    if args.reason:
        body["reason"] = args.reason
    answer = http.ok("POST", "/api/lock/force-release", body, what=f"force-release {args.device}")
    if args.json:
        print_json(answer, out)
        return EXIT_OK
    gone = answer.get("released", [])
    if not gone:
        out.write(f"{args.device}: no lock to release\n")
    for lk in gone:
        out.write(f"force-released {lk.get('device_name')} from {lk.get('user_id')} ({lk.get('lock_type')})\n")
    return EXIT_OK


def cmd_devices(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    path = "/api/device-config/devices"
    if args.device_type:
        path += "?" + urllib.parse.urlencode({"device_type": args.device_type})
    status, answer = http.call("GET", path)
    if status == 404 and not (isinstance(answer, dict) and answer.get("success") is False):
        raise CliError(f"the service at {http.url} has no device discovery (/api/device-config): "
                       "it predates it, or is not a bs-coordination service; a service discovers "
                       "devices when started with --profile-collection", EXIT_NOT_FOUND, answer)
    if not 200 <= status < 300:
        raise CliError(f"devices: {message_of(status, answer)}", exit_code_for(status), answer)
    if args.json:
        print_json(answer, out)
        return EXIT_OK
    devices = answer.get("devices", answer) if isinstance(answer, dict) else answer
    if isinstance(devices, dict):  # {name: {...}} form
        devices = [{"name": k, **v} for k, v in devices.items()]
    if not devices:
        out.write(no_devices_reason(http) + "\n")
        return EXIT_OK
    rows = [[str(d.get("name", "")), str(d.get("device_type", "")), str(d.get("device_class", "")),
             str(d.get("module", "") or "")] for d in devices]
    table(sorted(rows), ["NAME", "TYPE", "CLASS", "MODULE"], out)
    return EXIT_OK


def no_devices_reason(http: Http) -> str:
    """Why the device list is empty, from ``/api/device-config/status`` when it says."""
    status, info = http.call("GET", "/api/device-config/status")
    if status == 200 and isinstance(info, dict) and info.get("configured"):
        if info.get("last_error"):
            return f"no devices: loading the profile collection {info.get('path')} failed: {info['last_error']}"
        if not info.get("ready"):
            return f"no devices yet: the profile collection {info.get('path')} is still loading"
        return f"no devices: the profile collection {info.get('path')} defines none"
    return ("no devices: the service discovers devices only when started with "
            "--profile-collection (COORDINATION_PROFILE_COLLECTION)")


def event_line(msg: dict[str, Any]) -> str:
    lock = msg.get("lock") or {}
    reason = f": {lock['reason']}" if lock.get("reason") else ""
    until = f" until {show_until(lock.get('expires_at'))}" if msg.get("action") in ("acquired", "renewed",
                                                                                    "restored", "upgraded") else ""
    return (f"{show_time(msg.get('timestamp'))}  {msg.get('action', '?'):<14} {msg.get('device_name')}  "
            f"{lock.get('lock_type')} {lock.get('user_id')}{until}{reason}")


def ws_url_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))


async def watch(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    """Print lock events until interrupted (or ``--count`` events); reconnect with ``since``."""
    import aiohttp

    seen = 0
    since: str | None = None
    delay = 0.2
    async with aiohttp.ClientSession(headers=http.headers()) as session:
        while True:
            url = ws_url_of(http.url) + (f"?since={urllib.parse.quote(since)}" if since else "")
            try:
                async with session.ws_connect(url, heartbeat=20.0) as ws:
                    delay = 0.2
                    async for frame in ws:
                        if frame.type != aiohttp.WSMsgType.TEXT:
                            continue
                        msg = json.loads(frame.data)
                        kind = msg.get("type")
                        if kind == "initial_status":
                            data = msg.get("data", {})
                            since = since or data.get("last_event_id")
                            if args.json:
                                out.write(json.dumps(msg) + "\n")
                            elif seen == 0 and not args.quiet:
                                rows = lock_rows(data.get("locks", []))
                                if rows:
                                    table(rows, LOCK_HEADERS, out)
                                else:
                                    out.write("no locks held\n")
                                out.write("-- watching lock events (Ctrl-C to stop) --\n")
                        elif kind == "lock_update":
                            since = msg.get("event_id") or since
                            out.write((json.dumps(msg) if args.json else event_line(msg)) + "\n")
                            seen += 1
                        elif kind == "error":
                            sys.stderr.write(f"service: {msg.get('message')}\n")
                        out.flush()
                        if args.count and seen >= args.count:
                            return EXIT_OK
                sys.stderr.write(f"connection closed; reconnecting from event {since}\n")
            except aiohttp.WSServerHandshakeError as exc:
                raise CliError(f"watch: WebSocket refused: HTTP {exc.status}", exit_code_for(exc.status)) from None
            except (aiohttp.ClientError, OSError) as exc:
                if since is None:
                    raise CliError(f"cannot reach the coordination service at {http.url}: {exc}") from None
                sys.stderr.write(f"connection lost ({exc}); reconnecting from event {since}\n")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def cmd_watch(http: Http, args: argparse.Namespace, out: TextIO) -> int:
    try:
        return asyncio.run(watch(http, args, out))
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_keys_new(http: Http, args: argparse.Namespace, out: TextIO) -> int:
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

    parser.add_argument("--url", default=default(env.get("COORDINATION_URL") or DEFAULT_URL),
                        help=f"service URL [COORDINATION_URL] (default {DEFAULT_URL})")
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

    p = sub.add_parser("renew", parents=[common], help="extend every lock of a key")
    p.add_argument("--key", required=True, help="the lock key printed by 'lock'")
    p.add_argument("--timeout", type=lease, default=300.0, metavar="SECONDS",
                   help="new lease from now, or 'none' (default 300)")
    p.set_defaults(func=cmd_renew)

    p = sub.add_parser("force-release", parents=[common], help="remove every lock on a device (admin)")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--reason", help="why (recorded in the event log)")
    p.set_defaults(func=cmd_force_release)

    p = sub.add_parser("watch", parents=[common], help="print lock events live until Ctrl-C")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
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
    return parser


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "operator"


def join_key_values(argv: list[str]) -> list[str]:
    """``--key -Xy...`` -> ``--key=-Xy...``: a lock key may start with ``-``, which argparse
    would otherwise take for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--key" and i + 1 < len(argv):
            out.append(f"--key={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bs-coordination`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return cmd_serve(argv[1:])
    args = build_parser().parse_args(join_key_values(argv))
    http = Http(args.url, args.api_key, args.request_timeout)
    out = sys.stdout
    try:
        code: int = args.func(http, args, out)
    except CliError as exc:
        sys.stderr.write(f"bs-coordination: {exc.message}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    with contextlib.suppress(Exception):
        out.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
