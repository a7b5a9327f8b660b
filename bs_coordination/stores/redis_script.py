"""The Redis store's wire: one Lua script, ``CAS``, and a plain RESP encoder.

``CAS`` holds no lock logic (that stays in ``locktable``, the one copy every store runs). It
is a compare-and-swap of a diff the lock table computed in Python: it checks that every key
the operation read still has the version it read, and only then reserves fencing-token and
ticket values, runs the write commands, and gives every key it changed a new version, all as
one atomic command. ``redis`` explains why this shape; ``redis_txn`` builds the calls.
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis.exceptions import NoScriptError

#: KEYS: every key the operation reads or writes; then the version hash and the version
#:       sequence (always the last two).
#: ARGV: now (the operation's clock, s), max ahead (s), max delay (s);
#:       c, then c triples: key index, kind ("h": hash, read with HVALS; "s": set, SMEMBERS),
#:          the version read ("" = the key was absent);
#:       m, then m pairs: counter key index, number of values to reserve;
#:       w, then w key indexes whose version the writes change;
#:       then commands to the end: name, key index (0: none), n, then n arguments. An argument
#:       may hold holes "\0<counter>:<offset>\0": the counter's reserved base + offset.
#: Returns {status, TIME seconds, TIME microseconds, ...}:
#:   "clock": ``now`` is more than max ahead of TIME, or more than max delay behind it;
#:            nothing is checked or written.
#:   "stale": then a list of triples: check number (1-based), current version, contents
#:            (HVALS or SMEMBERS) for every check that failed; nothing is written.
#:   "ok":    then the new version ("0" when nothing was written), the reserved bases (each
#:            counter's value before this call), the replies of the commands.
CAS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local used = tonumber(ARGV[1])
if used - now > tonumber(ARGV[2]) or now - used > tonumber(ARGV[3]) then
  return {'clock', t[1], t[2]}
end
local ver, seqkey = KEYS[#KEYS - 1], KEYS[#KEYS]
local function next_version()
  local seq = redis.call('INCR', seqkey)
  if seq == 1 then
    -- a new (or emptied) Redis: start above any version a replica may still have cached
    seq = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('SET', seqkey, string.format('%d', seq))
  end
  return string.format('%d', seq)
end
local i = 5
local stale = {}
for c = 1, tonumber(ARGV[4]) do
  local key = KEYS[tonumber(ARGV[i])]
  local want = ARGV[i + 2]
  local v = redis.call('HGET', ver, key) or ''
  local same = v == want
  if same and want == '' then same = redis.call('EXISTS', key) == 0 end
  if not same then
    local data
    if ARGV[i + 1] == 'h' then data = redis.call('HVALS', key)
    else data = redis.call('SMEMBERS', key) end
    if v == '' and #data > 0 then
      -- written by something that keeps no version: give it one, so it can be compared
      v = next_version()
      redis.call('HSET', ver, key, v)
    end
    stale[#stale + 1] = c
    stale[#stale + 1] = v
    stale[#stale + 1] = data
  end
  i = i + 3
end
if #stale > 0 then return {'stale', t[1], t[2], stale} end
local bases = {}
local counters = tonumber(ARGV[i])
i = i + 1
for c = 1, counters do
  local n = tonumber(ARGV[i + 1])
  bases[c] = redis.call('INCRBY', KEYS[tonumber(ARGV[i])], n) - n
  i = i + 2
end
local written = {}
for w = 1, tonumber(ARGV[i]) do written[w] = KEYS[tonumber(ARGV[i + w])] end
i = i + 1 + #written
local function fill(c, k)
  return string.format('%d', bases[tonumber(c)] + tonumber(k))
end
local out = {}
while i <= #ARGV do
  local cmd = {ARGV[i]}
  local key = tonumber(ARGV[i + 1])
  if key > 0 then cmd[2] = KEYS[key] end
  local n = tonumber(ARGV[i + 2])
  for j = 1, n do
    local a = ARGV[i + 2 + j]
    if counters > 0 and string.find(a, '%z') then a = string.gsub(a, '%z(%d+):(%d+)%z', fill) end
    cmd[#cmd + 1] = a
  end
  out[#out + 1] = redis.call(unpack(cmd))
  i = i + 3 + n
end
local seq = '0'
if #written > 0 then
  seq = next_version()
  for _, key in ipairs(written) do
    if redis.call('EXISTS', key) == 1 then redis.call('HSET', ver, key, seq)
    else redis.call('HDEL', ver, key) end
  end
end
return {'ok', t[1], t[2], seq, bases, out}
"""

CAS_SHA = hashlib.sha1(CAS.encode()).hexdigest()


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP encoding of ``commands`` (``str``, ``bytes``, ``int``; floats must come as text).

    Plain and much cheaper than redis-py's general encoder, which showed up first in profiles.
    """
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            if isinstance(arg, int):
                data = b"%d" % arg
            else:
                data = arg.encode() if isinstance(arg, str) else arg
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def is_noscript(value: object) -> bool:
    """The server does not have the script (a restart empties its script cache)."""
    return isinstance(value, NoScriptError) or (
        isinstance(value, Exception) and str(value).startswith("NOSCRIPT"))
