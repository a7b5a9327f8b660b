"""The Redis store's Lua scripts: ``CAS``, the commit of the transaction engine, and ``ATTACH``.

``CAS`` holds no lock logic (that stays in ``locktable``, the one copy every store runs, and the
optimistic machinery in ``stores/txn.py``). It is the engine's ``Backend.commit``: it checks
that every logical key read still has the version it was read at, and only then writes the
new texts under one new version, the set of names, the expiry index and the events, all as
one atomic command; on a failed check it answers every checked key as it is at that instant.
Both scripts are registered with redis-py (``register_script``: ``EVALSHA``, and ``SCRIPT
LOAD`` again when a restarted or failed-over Redis answers ``NOSCRIPT``). ``redis`` explains
why this shape; ``cas_call`` turns the engine's ``Commit`` into the call's KEYS and ARGV.
"""

from __future__ import annotations

from typing import Any

from bs_coordination.stores import redis_keys as rk
from bs_coordination.stores.redis_json import event_json
from bs_coordination.stores.txn_backend import Commit

#: How many fixed keys come first in every ``CAS`` call's KEYS.
FIXED_KEYS = 4

#: KEYS: 1 the meta hash, 2 the set of names, 3 the expiry index, 4 the event stream (as
#:       ``KeySpace.fixed``); then the ``n`` logical keys checked, then the keys written
#:       without a check (none from the engine today, but allowed).
#: ARGV: 1 now (the operations' clock, s), 2 max ahead (s), 3 max delay (s), 4 the table's
#:       epoch as the caller knows it (``ATTACH``), 5 the caller's floor (the highest token or
#:       version it has seen: the new version is above it), 6 n (keys checked), 7 c (counter
#:       values to reserve: the most of any counter), 8 w (keys written), 9 names to add,
#:       10 names to remove, 11 expiry entries to add, 12 to remove, 13 events, 14 the
#:       stream's MAXLEN; then: n versions read ("0": absent), w pairs (index in KEYS, new
#:       text; "" deletes the key), the names to add and to remove, the expiry entries to add
#:       (score, member) and to remove (member), the events' JSON texts (a hole "\1<n>\1"
#:       in one is the n-th counter value this commit hands out: V + n - 1).
#: Returns {status, TIME seconds, TIME microseconds, ...}:
#:   "clock": ``now`` is more than max ahead of TIME, or more than max delay behind it;
#:            nothing is checked or written.
#:   "lost":  the meta hash's ``epoch`` is not the caller's: Redis lost its data (emptied,
#:            restarted without persistence) since the caller attached, or another table
#:            replaced it; then the epoch found ("" if none). Nothing is written.
#:   "stale": a check failed; then every checked key's current value ("<version> <text>", or
#:            nil), read at this instant. Nothing is written.
#:   "ok":    then the new version V ("0" when nothing was written) and the ids of the events
#:            appended, in order. Every key written holds "V <text>"; the counter values the
#:            commit handed out are V .. V + c - 1 (``redis_json.filler``), and the next
#:            version is above them.
#: Versions are Redis time in microseconds (one more than the last, ``meta.last``, if the
#: clock has not moved on, and above the caller's floor): a Redis restored from an older state,
#: or emptied, never hands out again a version a replica may have cached, nor a token issued.
CAS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local used = tonumber(ARGV[1])
if used - now > tonumber(ARGV[2]) or now - used > tonumber(ARGV[3]) then
  return {'clock', t[1], t[2]}
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'last')
if meta[1] ~= ARGV[4] then return {'lost', t[1], t[2], meta[1] or ''} end
local n, w = tonumber(ARGV[6]), tonumber(ARGV[8])
local i = 14
if n > 0 then
  local got = redis.call('MGET', unpack(KEYS, 5, 4 + n))
  for c = 1, n do
    local want, v = ARGV[i + c], got[c]
    local same
    if want == '0' then same = not v
    else same = v and string.sub(v, 1, #want + 1) == want .. ' ' end
    if not same then return {'stale', t[1], t[2], got} end
  end
  i = i + n
end
local ver = '0'
if w > 0 then
  local v = math.max(tonumber(meta[2] or '0') + 1,
                     tonumber(t[1]) * 1000000 + tonumber(t[2]), tonumber(ARGV[5]) + 1)
  ver = string.format('%d', v)
  local c = tonumber(ARGV[7])
  redis.call('HSET', KEYS[1], 'last', string.format('%d', v + math.max(c - 1, 0)))
  local set, del = {}, {}
  for j = 1, w do
    local key, text = KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
    if text == '' then del[#del + 1] = key
    else
      set[#set + 1] = key
      set[#set + 1] = ver .. ' ' .. text
    end
    i = i + 2
  end
  if #set > 0 then redis.call('MSET', unpack(set)) end
  if #del > 0 then redis.call('DEL', unpack(del)) end
end
local add, rem, zadd, zrem = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]),
  tonumber(ARGV[12])
if add > 0 then redis.call('SADD', KEYS[2], unpack(ARGV, i + 1, i + add)) end
i = i + add
if rem > 0 then redis.call('SREM', KEYS[2], unpack(ARGV, i + 1, i + rem)) end
i = i + rem
if zadd > 0 then redis.call('ZADD', KEYS[3], unpack(ARGV, i + 1, i + 2 * zadd)) end
i = i + 2 * zadd
if zrem > 0 then redis.call('ZREM', KEYS[3], unpack(ARGV, i + 1, i + zrem)) end
i = i + zrem
local ids = {}
local base = tonumber(ver)
local function fill(k) return string.format('%d', base + tonumber(k) - 1) end
for e = 1, tonumber(ARGV[13]) do
  local text = ARGV[i + e]
  if string.find(text, '\1', 1, true) then text = (string.gsub(text, '\1(%d+)\1', fill)) end
  ids[e] = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[14], '*', 'e', text)
end
return {'ok', t[1], t[2], ver, ids}
"""

#: Attach a store to its Redis data: the generation marker ``epoch`` of the meta hash.
#: KEYS: 1 the meta hash, 2 ``<p>:versions``, 3 the set of names, 4 the old waiters hash, 5 and
#: 6 the old token and ticket counters (``KeySpace``). ARGV: 1 a new epoch, 2 the caller's floor.
#: Returns {epoch, state}: state 0: found; 1: created (no table was there); 2: the old layout
#: is there (``redis_migrate`` moves it, then attaches again; epoch ""). When it creates the
#: table it sets ``last`` to Redis time in microseconds (and above the floor), so fencing
#: tokens stay above every token handed out before, without remembering any; and it writes
#: the ``MOVED`` marker (ARGV 3) where an older store version keeps its version hash.
ATTACH = r"""
local e = redis.call('HGET', KEYS[1], 'epoch')
if e then return {e, 0} end
if redis.call('TYPE', KEYS[2]).ok == 'hash'
    or redis.call('EXISTS', KEYS[3], KEYS[4], KEYS[5], KEYS[6]) > 0 then
  return {'', 2}
end
local t = redis.call('TIME')
local base = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'last', string.format('%d', base))
redis.call('SET', KEYS[2], ARGV[3])
return {ARGV[1], 1}
"""


def cas_call(keys: rk.KeySpace, commit: Commit, epoch: str, floor: int,
             limits: tuple[float, float]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the ``CAS`` call committing ``commit`` to the table ``epoch``;
    ``floor``: the version is above it; ``limits``: max ahead and max delay (seconds)."""
    table = keys.table
    checked = list(commit.checks)
    index = {k: i for i, k in enumerate(checked, start=FIXED_KEYS + 1)}
    extra = [k for k in commit.writes if k not in index]
    for k in extra:
        index[k] = len(index) + FIXED_KEYS + 1
    writes: list[Any] = []
    added: list[str] = []
    removed: list[str] = []
    for k, text in commit.writes.items():
        writes += (index[k], "" if text is None else text)
        if k[0] == "r":  # the set of names with records follows the records' keys
            (added if text is not None else removed).append(k[2:])
    zadd: list[Any] = []
    zrem: list[str] = []
    for name, key_hash, _, new in commit.expiry:
        member = rk.expiry_member((name, key_hash))
        if new is None:
            zrem.append(member)
        else:
            zadd += (repr(new), member)
    events = [event_json(e) for _, e in commit.events]
    args = [repr(commit.now), limits[0], limits[1], epoch, floor, len(checked),
            max(commit.counters.values(), default=0), len(commit.writes), len(added),
            len(removed), len(zadd) // 2, len(zrem), len(events), rk.EVENTS_MAXLEN,
            *(str(v) for v in commit.checks.values()), *writes, *added, *removed, *zadd, *zrem,
            *events]
    return [*keys.fixed, *(table(k) for k in checked), *(table(k) for k in extra)], args
