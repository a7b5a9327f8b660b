"""Every Redis key the Redis store uses, in one place (as arq's ``constants.py``).

All keys start with one prefix (default ``bsc``), so several deployments can share a Redis
database by choosing different prefixes. The lock key itself is never stored: records carry
only its SHA-256 (``key_hash``).

==================================  ===========  ============================================
key                                 type         holds
==================================  ===========  ============================================
``<p>:rec:<device>``                hash         key_hash -> record JSON (``LockRecord``)
``<p>:under:<device>``              set          names strictly below ``<device>`` with records
``<p>:key:<key_hash>``              set          names holding a record under that key
``<p>:names``                       set          every name holding a record (status listing)
``<p>:expiry``                      sorted set   ``"<device> <key_hash>"`` scored by expires_at
``<p>:waiters``                     hash         ticket -> waiter JSON (requests with ``wait``)
``<p>:counter:<name>``              string       last value handed out (fencing ``token``,
                                                 wait ``ticket``)
``<p>:events``                      stream       field ``e``: the event's JSON (``redis_codec``)
``<p>:versions``                    hash         key -> version of its content (records, under,
                                                 key sets and waiters; none while empty);
                                                 ``~last``: the last version handed out;
                                                 ``~epoch``: the data's generation (a store
                                                 that finds another one lost its data)
==================================  ===========  ============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bs_coordination.locktable import TICKET_COUNTER, TOKEN_COUNTER, RecordId

#: Prefix of every key unless the store is given another.
DEFAULT_PREFIX = "bsc"

RECORDS = "rec"
UNDER = "under"
KEY_NAMES = "key"
NAMES = "names"
EXPIRY = "expiry"
WAITERS = "waiters"
COUNTER = "counter"
EVENTS = "events"
VERSIONS = "versions"

#: Field of the version hash naming the data's generation (``redis_script.ATTACH``).
EPOCH_FIELD = "~epoch"

#: Stream field holding an event's JSON (``redis_codec.event_json``).
EVENT_FIELD = "e"
#: The field of entries appended before (the ``LockUpdateMessage`` JSON without its id).
OLD_EVENT_FIELD = "m"
#: Approximate length the event stream is trimmed to (``XADD ... MAXLEN ~``).
EVENTS_MAXLEN = 10_000


@dataclass(frozen=True)
class KeySpace:
    """Builds the key names under one prefix."""

    prefix: str = DEFAULT_PREFIX
    # The per-name keys' beginnings, made once: they are built on every lock operation.
    _records: str = field(init=False, repr=False, compare=False)
    _under: str = field(init=False, repr=False, compare=False)
    _key_names: str = field(init=False, repr=False, compare=False)
    _fixed_utf8: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_records", f"{self.prefix}:{RECORDS}:")
        object.__setattr__(self, "_under", f"{self.prefix}:{UNDER}:")
        object.__setattr__(self, "_key_names", f"{self.prefix}:{KEY_NAMES}:")
        object.__setattr__(self, "_fixed_utf8", tuple(key.encode() for key in self.fixed))

    def records(self, name: str) -> str:
        return self._records + name  # f"{prefix}:rec:{name}"

    def under(self, name: str) -> str:
        return self._under + name  # f"{prefix}:under:{name}"

    def key_names(self, key_hash: str) -> str:
        return self._key_names + key_hash  # f"{prefix}:key:{key_hash}"

    def counter(self, name: str) -> str:
        return f"{self.prefix}:{COUNTER}:{name}"

    @property
    def names(self) -> str:
        return f"{self.prefix}:{NAMES}"

    @property
    def expiry(self) -> str:
        return f"{self.prefix}:{EXPIRY}"

    @property
    def waiters(self) -> str:
        return f"{self.prefix}:{WAITERS}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:{EVENTS}"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:{VERSIONS}"

    @property
    def fixed(self) -> tuple[str, ...]:
        """The keys every ``CAS`` call names first, in this order (``redis_script``)."""
        return (self.versions, self.names, self.expiry, self.events,
                self.counter(TOKEN_COUNTER), self.counter(TICKET_COUNTER))

    @property
    def fixed_utf8(self) -> tuple[bytes, ...]:
        """``fixed`` as UTF-8, made once (every ``CAS`` call sends them)."""
        return self._fixed_utf8


def expiry_member(record_id: RecordId) -> str:
    """Member of the expiry index for a record (device names never contain a space)."""
    name, key_hash = record_id
    return f"{name} {key_hash}"


def parse_expiry_member(member: str) -> RecordId:
    name, _, key_hash = member.rpartition(" ")
    return (name, key_hash)
