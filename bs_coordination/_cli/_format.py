"""What an operator reads: lock tables, holder lines, event lines, times and countdowns.

Everything works on the service's JSON (dicts), so ``--json`` and the tables show the same
records.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, TextIO

from pydantic import BaseModel

from bs_coordination.models import names_overlap

LOCK_HEADERS = ["DEVICE", "TYPE", "HOLDER", "REASON", "SINCE", "UNTIL"]

#: Actions whose event line shows the lease end.
_LEASE_ACTIONS = ("acquired", "renewed", "restored", "upgraded")


def as_json(value: BaseModel) -> dict[str, Any]:
    """A response model as the service sent it: the fields its answer held, JSON-typed."""
    return value.model_dump(mode="json", exclude_unset=True)


def print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


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


def print_locks(locks: list[dict[str, Any]], out: TextIO) -> None:
    """The lock table, or ``no locks held``."""
    rows = lock_rows(locks)
    if rows:
        table(rows, LOCK_HEADERS, out)
    else:
        out.write("no locks held\n")


def event_line(msg: dict[str, Any]) -> str:
    """One ``lock_update`` message as a line: time, action, device, type, holder, lease, reason."""
    lock = msg.get("lock") or {}
    reason = f": {lock['reason']}" if lock.get("reason") else ""
    until = f" until {show_until(lock.get('expires_at'))}" if msg.get("action") in _LEASE_ACTIONS else ""
    # Who caused it, when that is not the holder (a force-release by an admin).
    actor = msg.get("actor")
    by = f" by {actor}" if actor and actor != lock.get("user_id") else ""
    # Why it was done, when its author said (a force release's reason).
    why = f" (reason: {msg['reason']})" if msg.get("reason") else ""
    return (f"{show_time(msg.get('timestamp'))}  {msg.get('action', '?'):<14} {msg.get('device_name')}  "
            f"{lock.get('lock_type')} {lock.get('user_id')}{by}{why}{until}{reason}")
