"""The JSON texts the Redis store keeps: records, waiters and events, with the standard
library's ``json`` over the lock table's own ``to_dict``/``from_dict``.

Nothing here names a record's fields: a field added to ``LockRecord`` (with its ``to_dict``
and ``from_dict``) is stored, read back and shown in events with no change to this store.

A counter value the ``CAS`` script reserves (a record's ``token``, a waiter's ``ticket``) is
written as the text the caller passes: the number, or a hole ``\\1<counter>:<offset>\\1`` the
script fills (``redis_txn``). That member is written first, outside ``json.dumps``, so the hole
is exactly where the number goes (JSON text never holds a raw control character otherwise).

An event is kept as ``{"action", "timestamp", "actor", ["reason",] "lock"}``, ``lock`` being the record's
fields without its secret ``key_hash``, and read back with the same ``to_message`` the memory
store uses, so every replica shows an event exactly as the one that appended it. Entries
written before this format (field ``m``: the message's JSON) are still read.
"""

from __future__ import annotations

import json
from typing import Any

from bs_coordination.locktable import Event, LockRecord, Waiter
from bs_coordination.models import LockAction, LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.base import to_message

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _with_first(name: str, value: str, rest: dict[str, Any]) -> str:
    """``{"<name>":<value>, ...rest}`` (``value`` is JSON text already, or a hole)."""
    return f'{{"{name}":{value},{_dumps(rest)[1:]}'


def _record_fields(rec: LockRecord, *, secret: bool) -> dict[str, Any]:
    d = rec.to_dict()
    del d["token"]
    if not secret:
        del d["key_hash"]
    return d


def record_json(rec: LockRecord, token: str) -> str:
    """A record as stored (``LockRecord.to_dict()``), its token written as ``token``."""
    return _with_first("token", token, _record_fields(rec, secret=True))


def parse_record(text: str) -> LockRecord:
    return LockRecord.from_dict(json.loads(text))


def waiter_json(w: Waiter, ticket: str) -> str:
    """A waiter as stored (``Waiter.to_dict()``), its ticket written as ``ticket``."""
    d = w.to_dict()
    del d["ticket"]
    return _with_first("ticket", ticket, d)


def parse_waiter(text: str) -> Waiter:
    return Waiter.from_dict(json.loads(text))


def event_json(event: Event, token: str) -> str:
    """An event as appended (its record's token written as ``token``)."""
    fields: dict[str, Any] = {"action": event.action.value, "timestamp": event.timestamp,
                              "actor": event.actor}
    if event.reason is not None:
        fields["reason"] = event.reason
    head = _dumps(fields)
    lock = _with_first("token", token, _record_fields(event.record, secret=False))
    return f'{head[:-1]},"lock":{lock}}}'


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
