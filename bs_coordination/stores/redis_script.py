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

#: KEYS: every key the operation reads or writes; then the version hash (always last).
#: ARGV: now (the operation's clock, s), max ahead (s), max delay (s), then one JSON array:
#:       [checks, counters, written, emptied, commands], each flat:
#:       checks: per key read: key index, kind ("h": hash, read with HVALS; "s": set,
#:          SMEMBERS), the version read ("" = the key was absent);
#:       counters: per counter used: key index, number of values to reserve;
#:       written, emptied: indexes of the keys the commands change, that hold something
#:          after them / that they empty;
#:       commands: per command: name, key index (0: none), n, then n arguments: a string,
#:          or a number i for ARGV[i] (the long texts: records and events, sent as they are
#:          instead of escaped inside this JSON). An ARGV text may hold holes
#:          "\1<counter>:<offset>\1": that counter's reserved base plus offset (JSON text
#:          never holds a raw control character, so only holes do).
#:       then the texts.
#: Returns {status, TIME seconds, TIME microseconds, ...}:
#:   "clock": ``now`` is more than max ahead of TIME, or more than max delay behind it;
#:            nothing is checked or written.
#:   "stale": then a flat list: check number (1-based), current version, contents (HVALS or
#:            SMEMBERS) for every check that failed; nothing is written (but the version of
#:            a key whose version and content disagree: a key with content has one, an
#:            empty key none).
#:   "ok":    then the new version ("0" when nothing was written), the reserved bases (each
#:            counter's value before this call), the replies of the commands.
#: Versions are Redis time in microseconds (one more than the last if the clock has not moved
#: on; the last is the version hash's field LAST): a Redis restored from an older state, or
#: emptied, never hands out again a version a replica may have cached. Few ``redis.call``s
#: (each costs more than the command it runs): one HMGET for every check, one EXISTS for
#: every key believed absent, one HSET for every new version.
CAS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local used = tonumber(ARGV[1])
if used - now > tonumber(ARGV[2]) or now - used > tonumber(ARGV[3]) then
  return {'clock', t[1], t[2]}
end
local ver, LAST = KEYS[#KEYS], '~last'
local p = cjson.decode(ARGV[4])
local checks, counters, written, emptied, cmds = p[1], p[2], p[3], p[4], p[5]
local fields = {}
for c = 1, #checks, 3 do fields[#fields + 1] = KEYS[checks[c]] end
fields[#fields + 1] = LAST
local got = redis.call('HMGET', ver, unpack(fields))
local last = tonumber(got[#got] or '0')
local function next_version()
  last = math.max(last + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  return string.format('%d', last)
end
local absent = {}
for c = 1, #checks, 3 do
  if checks[c + 2] == '' and not got[(c + 2) / 3] then absent[#absent + 1] = KEYS[checks[c]] end
end
local some_exist = #absent > 0 and redis.call('EXISTS', unpack(absent)) > 0
local stale = {}
for c = 1, #checks, 3 do
  local key, want = KEYS[checks[c]], checks[c + 2]
  local v = got[(c + 2) / 3] or ''
  local same = v == want
  if same and want == '' and some_exist then same = redis.call('EXISTS', key) == 0 end
  if not same then
    local data
    if checks[c + 1] == 'h' then data = redis.call('HVALS', key)
    else data = redis.call('SMEMBERS', key) end
    if v == '' and #data > 0 then
      v = next_version()
      redis.call('HSET', ver, key, v, LAST, v)
    elseif v ~= '' and #data == 0 then
      v = ''
      redis.call('HDEL', ver, key)
    end
    stale[#stale + 1] = (c + 2) / 3
    stale[#stale + 1] = v
    stale[#stale + 1] = data
  end
end
if #stale > 0 then return {'stale', t[1], t[2], stale} end
local bases = {}
for c = 1, #counters, 2 do
  local n = counters[c + 1]
  bases[#bases + 1] = redis.call('INCRBY', KEYS[counters[c]], n) - n
end
-- New versions first: should a command fail (the script stops there, keeping what it
-- wrote), no changed key keeps the version a replica may have cached.
local seq = '0'
if #written + #emptied > 0 then
  seq = next_version()
  local set = {LAST, seq}
  for _, k in ipairs(written) do
    set[#set + 1] = KEYS[k]
    set[#set + 1] = seq
  end
  redis.call('HSET', ver, unpack(set))
  if #emptied > 0 then
    local gone = {}
    for _, k in ipairs(emptied) do gone[#gone + 1] = KEYS[k] end
    redis.call('HDEL', ver, unpack(gone))
  end
end
local function fill(c, k)
  return string.format('%d', bases[tonumber(c)] + tonumber(k))
end
local out = {}
local i = 1
while i <= #cmds do
  local cmd = {cmds[i]}
  local key = cmds[i + 1]
  if key > 0 then cmd[2] = KEYS[key] end
  local n = cmds[i + 2]
  for j = 1, n do
    local a = cmds[i + 2 + j]
    if type(a) == 'number' then
      a = ARGV[a]
      if #bases > 0 and string.find(a, '\1', 1, true) then
        a = string.gsub(a, '\1(%d+):(%d+)\1', fill)
      end
    end
    cmd[#cmd + 1] = a
  end
  out[#out + 1] = redis.call(unpack(cmd))
  i = i + 3 + n
end
return {'ok', t[1], t[2], seq, bases, out}
"""

CAS_SHA = hashlib.sha1(CAS.encode()).hexdigest()


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP encoding of ``commands`` (``str`` and ``int`` arguments; floats must come as text).

    Plain and much cheaper than redis-py's general encoder, which showed up first in profiles.
    """
    out: list[str] = []
    for cmd in commands:
        out.append(f"*{len(cmd)}\r\n")
        for arg in cmd:
            text = arg if type(arg) is str else str(arg)
            size = len(text) if text.isascii() else len(text.encode())
            out.append(f"${size}\r\n{text}\r\n")
    return "".join(out).encode()


def is_noscript(value: object) -> bool:
    """The server does not have the script (a restart empties its script cache)."""
    return isinstance(value, NoScriptError) or (
        isinstance(value, Exception) and str(value).startswith("NOSCRIPT"))
