"""The JSON texts the Redis store keeps in its event stream, and the old layout's texts it
migrates, with the standard library's ``json`` over the lock table's own
``to_dict``/``from_dict``. (The table's values are the transaction engine's texts:
``txn_backend.encode``.)

Nothing here names a record's fields: a field added to ``LockRecord`` (with its ``to_dict``
and ``from_dict``) is stored, read back and shown in events with no change to this store.

An event is kept as ``{"action", "timestamp", "actor", ["reason",] "lock"}``, ``lock`` being
the record's fields without its secret ``key_hash``, and read back with the same
``to_message`` the memory store uses, so every replica shows an event exactly as the one that
appended it. The event of a grant is made before its token is known (the engine's
placeholder): its text then holds a hole ``\\1<n>\\1`` where the number goes, which the
commit script fills with the ``n``-th value it handed out (``filler``), so the stream only ever
holds real tokens (JSON text never holds a raw control character otherwise). Entries written
before this format (field ``m``: the message's JSON) are still read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bs_coordination.locktable import Event, LockRecord, Waiter
from bs_coordination.models import LockAction, LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.base import to_message
from bs_coordination.stores.txn_backend import unplace

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def filler(version: int) -> Callable[[int], int]:
    """The counter values a commit at ``version`` handed out (``redis_script.CAS``): the
    ``n``-th value (placeholder ``n``, from 1) of any counter is ``version + n - 1``."""
    def fill(value: int) -> int:
        found = unplace(value)
        return value if found is None else version + found[1] - 1
    return fill


def parse_record(text: str) -> LockRecord:
    """A record of the old layout (``LockRecord.to_dict()`` JSON)."""
    return LockRecord.from_dict(json.loads(text))


def parse_waiter(text: str) -> Waiter:
    """A waiter of the old layout (``Waiter.to_dict()`` JSON)."""
    return Waiter.from_dict(json.loads(text))


def event_json(event: Event) -> str:
    """An event as appended (its record without the secret ``key_hash``; a placeholder token
    as a hole the script fills)."""
    fields: dict[str, Any] = {"action": event.action.value, "timestamp": event.timestamp,
                              "actor": event.actor}
    if event.reason is not None:
        fields["reason"] = event.reason
    lock = event.record.to_dict()
    del lock["key_hash"]
    fields["lock"] = lock
    text = _dumps(fields)
    found = unplace(event.record.token)
    if found is not None:  # the only unescaped '"token":' is the record's
        text = text.replace(f'"token":{event.record.token}', f'"token":\1{found[1]}\1', 1)
    return text


def parse_event(event_id: str, fields: dict[str, Any]) -> LockUpdateMessage:
    """The message of stream entry ``event_id`` (its ``fields``)."""
    text = fields.get(rk.EVENT_FIELD)
    if text is None:  # appended before events were kept as ``event_json``
        msg = LockUpdateMessage.model_validate_json(fields[rk.OLD_EVENT_FIELD])
        return msg.model_copy(update={"event_id": event_id})
    d = json.loads(text)
    lock = d["lock"]
    lock["key_hash"] = ""  # never in an event
    event = Event(LockAction(d["action"]), LockRecord.from_dict(lock), d["timestamp"], d["actor"],
                  d.get("reason"))
    return to_message(event, event_id)
