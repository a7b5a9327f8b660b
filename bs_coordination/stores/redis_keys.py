"""Every Redis key the Redis store uses, in one place (as arq's ``constants.py``).

All keys start with one prefix (default ``bsc``), so several deployments can share a Redis
database by choosing different prefixes. The lock key itself is never stored: records carry
only its SHA-256 (``key_hash``).

==================================  ===========  ============================================
key                                 type         holds
==================================  ===========  ============================================
``<p>:t:<logical key>``             string       ``"<version> <text>"``: one logical key of the
                                                 transaction engine (``stores/txn.py``:
                                                 ``r:<device>``, ``u:<device>``,
                                                 ``k:<key_hash>``, ``w``), its version first
``<p>:meta``                        hash         ``epoch``: the table's generation (a store that
                                                 finds another one lost its data); ``last``: the
                                                 last version handed out (and, with the
                                                 fencing tokens and tickets, above every one)
``<p>:names``                       set          every name holding a record (status listing)
``<p>:expiry``                      sorted set   ``"<device> <key_hash>"`` scored by due_at
``<p>:events``                      stream       field ``e``: the event's JSON (``redis_json``)
``<p>:versions``                    string       a marker that stops a replica of an older
                                                 version (which kept a hash here) from writing
==================================  ===========  ============================================

Before the transaction engine (the *old layout*, migrated at attach by ``redis_migrate``) the
table was ``<p>:rec:<device>`` (hash key_hash -> record JSON), ``<p>:under:<device>`` and
``<p>:key:<key_hash>`` (sets), ``<p>:waiters`` (hash ticket -> waiter JSON),
``<p>:counter:token`` and ``<p>:counter:ticket`` (strings) and ``<p>:versions`` (hash: key ->
version, ``~epoch``, ``~last``); ``names``, ``expiry`` and ``events`` are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bs_coordination.locktable import TICKET_COUNTER, TOKEN_COUNTER, RecordId

#: Prefix of every key unless the store is given another.
DEFAULT_PREFIX = "bsc"

TABLE = "t"
META = "meta"
NAMES = "names"
EXPIRY = "expiry"
EVENTS = "events"
VERSIONS = "versions"

#: Fields of the meta hash (``redis_script``).
EPOCH_FIELD = "epoch"
LAST_FIELD = "last"

#: Stream field holding an event's JSON (``redis_json.event_json``).
EVENT_FIELD = "e"
#: The field of entries appended before (the ``LockUpdateMessage`` JSON without its id).
OLD_EVENT_FIELD = "m"
#: Approximate length the event stream is trimmed to (``XADD ... MAXLEN ~``).
EVENTS_MAXLEN = 10_000

#: What ``<p>:versions`` holds once this layout is in use (a string where an older store
#: version expects a hash: its every call fails with ``WRONGTYPE``, closed, instead of writing
#: a second table beside this one).
MOVED = ("bs-coordination: this lock table moved to <prefix>:meta and <prefix>:t:* "
         "(a newer version); upgrade every replica")


@dataclass(frozen=True)
class KeySpace:
    """Builds the key names under one prefix."""

    prefix: str = DEFAULT_PREFIX
    # Made once: built on every lock operation.
    _table: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_table", f"{self.prefix}:{TABLE}:")

    def table(self, logical: str) -> str:
        """The key holding logical key ``logical`` of the transaction engine."""
        return self._table + logical  # f"{prefix}:t:{logical}"

    @property
    def meta(self) -> str:
        return f"{self.prefix}:{META}"

    @property
    def names(self) -> str:
        return f"{self.prefix}:{NAMES}"

    @property
    def expiry(self) -> str:
        return f"{self.prefix}:{EXPIRY}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:{EVENTS}"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:{VERSIONS}"

    @property
    def fixed(self) -> tuple[str, ...]:
        """The keys every ``CAS`` call names first, in this order (``redis_script``)."""
        return (self.meta, self.names, self.expiry, self.events)

    # -- the old layout (read and deleted by ``redis_migrate``) ------------------------------
    def old_records(self, name: str) -> str:
        return f"{self.prefix}:rec:{name}"

    def old_pattern(self, kind: str) -> str:
        """A ``SCAN`` pattern of every old ``rec``, ``under`` or ``key`` key."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}:{kind}:*"

    @property
    def old_waiters(self) -> str:
        return f"{self.prefix}:waiters"

    @property
    def old_counters(self) -> tuple[str, str]:
        return (f"{self.prefix}:counter:{TOKEN_COUNTER}", f"{self.prefix}:counter:{TICKET_COUNTER}")


def expiry_member(record_id: RecordId) -> str:
    """Member of the expiry index for a record (device names never contain a space)."""
    name, key_hash = record_id
    return f"{name} {key_hash}"


def parse_expiry_member(member: str) -> RecordId:
    name, _, key_hash = member.rpartition(" ")
    return (name, key_hash)
