"""The JSON texts the Redis store keeps: records, waiters and events.

Written by hand (field by field, strings escaped by the ``json`` module's C encoder, floats as
``repr``, which is JSON's shortest round-tripping form), because every lock operation writes
one or two of them and a general encoder costs twice as much. Every text is plain ASCII
(non-ASCII characters are ``\\u`` escapes), so its length is its size on the wire. A counter
value the script reserves (a record's ``token``, a waiter's ``ticket``) is written as the text
the caller passes: the number, or a hole the script fills (``redis_txn``).

An event is kept as what it is made of, ``{"action", "timestamp", "actor", "lock"}`` with the
record's public fields as ``lock`` (never its ``key_hash``), and read back with the same
``to_message`` the memory store uses, so every replica shows an event exactly as the one that
appended it. Entries written before this format (field ``m``: the message's JSON) are still read.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _string
from typing import Any

from bs_coordination.locktable import Event, LockRecord, Waiter
from bs_coordination.models import LockAction, LockState, LockType, LockUpdateMessage
from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.base import to_message

_dump = json.JSONEncoder(separators=(",", ":")).encode  # ensure_ascii (the default)


_floats: dict[float, str] = {}


def number(x: float) -> str:
    """``repr(x)``, remembered: an operation writes the same instants several times (its
    ``now`` as a record's ``acquired_at`` and as its event's ``timestamp``, an ``expires_at``
    in the record and in the expiry index), and ``repr`` of a float is not cheap."""
    text = _floats.get(x)
    if text is None:
        if len(_floats) >= 256:  # small: the repeats are close together
            _floats.clear()
        text = _floats[x] = repr(x)
    return text


def _optional(text: str | None) -> str:
    return "null" if text is None else _string(text)


#: Enum members as JSON (a dict lookup costs less than ``.value``).
_TYPES = {t: _string(t.value) for t in LockType}
_STATES = {s: _string(s.value) for s in LockState}
_ACTIONS = {a: _string(a.value) for a in LockAction}


def record_body(rec: LockRecord, token: str) -> str:
    """The record's public fields as JSON members, with the closing brace (no opening one)."""
    return (
        f'"device_name":{_string(rec.device_name)},"lock_type":{_TYPES[rec.lock_type]},'
        f'"user_id":{_string(rec.user_id)},"token":{token},"acquired_at":{number(rec.acquired_at)},'
        f'"expires_at":{"null" if rec.expires_at is None else number(rec.expires_at)},'
        f'"reason":{_optional(rec.reason)},"plan_uid":{_optional(rec.plan_uid)},'
        f'"state":{_STATES[rec.state]},'
        f'"preempted_by":{"null" if rec.preempted_by is None else _dump(rec.preempted_by)}'
        f'{_handshake(rec)}}}')


def _handshake(rec: LockRecord) -> str:
    """The preemption handshake's fields, only when the holder asked for it (``from_dict``
    reads their absence as the defaults)."""
    if not rec.ack_requested and rec.ack is None:
        return ""
    return (f',"ack_requested":{"true" if rec.ack_requested else "false"},'
            f'"ack":{"null" if rec.ack is None else _string(rec.ack.value)},'
            f'"ack_deadline":{"null" if rec.ack_deadline is None else number(rec.ack_deadline)},'
            f'"acknowledged_at":'
            f'{"null" if rec.acknowledged_at is None else number(rec.acknowledged_at)}')


def record_json(rec: LockRecord, body: str) -> str:
    """A record as stored (``body`` from ``record_body``): ``LockRecord.to_dict()``'s fields."""
    return f'{{"key_hash":"{rec.key_hash}",{body}'


def parse_record(text: str) -> LockRecord:
    return LockRecord.from_dict(json.loads(text))


def waiter_json(w: Waiter, ticket: str) -> str:
    """A waiter as stored: ``Waiter.to_dict()``'s fields."""
    return (f'{{"ticket":{ticket},"names":{_dump(list(w.names))},"priority":{w.priority},'
            f'"deadline":{number(w.deadline)}}}')


def parse_waiter(text: str) -> Waiter:
    return Waiter.from_dict(json.loads(text))


def event_json(event: Event, body: str) -> str:
    """An event as appended (``body``: its record's ``record_body``)."""
    return (f'{{"action":{_ACTIONS[event.action]},"timestamp":{number(event.timestamp)},'
            f'"actor":{_optional(event.actor)},"lock":{{{body}}}')


def parse_event(event_id: str, fields: dict[str, Any]) -> LockUpdateMessage:
    """The message of stream entry ``event_id`` (its ``fields``)."""
    text = fields.get(rk.EVENT_FIELD)
    if text is None:  # appended before events were kept as ``event_json``
        msg = LockUpdateMessage.model_validate_json(fields[rk.OLD_EVENT_FIELD])
        return msg.model_copy(update={"event_id": event_id})
    d = json.loads(text)
    lock = d["lock"]
    lock["key_hash"] = ""  # never in an event
    event = Event(LockAction(d["action"]), LockRecord.from_dict(lock), d["timestamp"], d["actor"])
    return to_message(event, event_id)
