"""The Redis store's Lua scripts: ``CAS``, the one call of every lock operation, and ``ATTACH``.

``CAS`` holds no lock logic (that stays in ``locktable``, the one copy every store runs). It
is a compare-and-swap of a diff the lock table computed in Python: it checks that every key
the operation read still has the version it read, and only then reserves fencing-token and
ticket values, runs the write commands, and gives every key it changed a new version, all as
one atomic command. Both are registered with redis-py (``register_script``: ``EVALSHA``, and
``SCRIPT LOAD`` again when a restarted or failed-over Redis answers ``NOSCRIPT``; ``CAS`` goes
through ``redis_batch``'s pipelines, which do the same).
``redis`` explains why this shape; ``redis_txn`` builds the calls.
"""

from __future__ import annotations

#: KEYS: first the fixed keys (``KeySpace.fixed``): 1 the version hash, 2 the set of names,
#:       3 the expiry index, 4 the event stream, 5 the token counter, 6 the ticket counter; then
#:       every key the operation read (each checked), in the order ``View`` read them.
#: ARGV: 1 now (the operation's clock, s), 2 max ahead (s), 3 max delay (s), 4 and 5 how many
#:       token and ticket values to reserve ("0": none), 6 the store's epoch as the caller
#:       knows it (``ATTACH``), 7 the token floor (the highest token the caller has seen: the
#:       token counter is raised to it before reserving); 8 a JSON array (decoded with the
#:       ``cjson`` Redis gives scripts: one argument rather than one per item, each of which
#:       redis-py would encode on its own), one string per key checked
#:       (``KEYS[FIXED_KEYS + c]``): its kind ("h": a hash, read with HVALS; "s": a set,
#:       SMEMBERS), a mark ("w": the commands write it and it holds something after them;
#:       "e": they empty it; "-": read only), then the version read ("" = the key was
#:       absent), as in "hw1732456789123456" or "s-"; 9 a JSON array of strings, the
#:       commands, each: name, n, key index, n arguments. An argument may hold holes
#:       "\1<counter>:<offset>\1" (counter 1: token, 2: ticket): that counter's reserved base
#:       plus offset (a record's JSON text never holds a raw control character, so only holes
#:       do).
#: Returns {status, TIME seconds, TIME microseconds, ...}:
#:   "lost":  the version hash's field ``~epoch`` is not the caller's epoch: Redis lost its
#:            data (emptied, restarted without persistence) since the caller attached, or
#:            another store generation replaced it; then the epoch found ("" if none).
#:            Nothing is checked or written.
#:   "clock": ``now`` is more than max ahead of TIME, or more than max delay behind it;
#:            nothing is checked or written.
#:   "stale": then a flat list: check number (1-based), current version, contents (HVALS or
#:            SMEMBERS) for every check that failed; nothing is written (but the version of
#:            a key whose version and content disagree: a key with content has one, an
#:            empty key none).
#:   "ok":    then the new version ("0" when nothing was written), the reserved bases (each
#:            counter's value before this call; 0 for a counter not used), the ids of the
#:            events appended (the XADDs' replies), in order.
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
local FIXED, ver, LAST, EPOCH = 6, KEYS[1], '~last', '~epoch'
local n = #KEYS - FIXED
local epoch = redis.call('HGET', ver, EPOCH)
if epoch ~= ARGV[6] then return {'lost', t[1], t[2], epoch or ''} end
local marked = cjson.decode(ARGV[8])
local checked, kinds, marks, want = {}, {}, {}, {}
for c = 1, n do
  local a = marked[c]
  checked[c] = KEYS[FIXED + c]
  kinds[c] = string.sub(a, 1, 1)
  marks[c] = string.sub(a, 2, 2)
  want[c] = string.sub(a, 3)
end
checked[n + 1] = LAST
local got = redis.call('HMGET', ver, unpack(checked))
checked[n + 1] = nil
local last = tonumber(got[n + 1] or '0')
local function next_version()
  last = math.max(last + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  return string.format('%d', last)
end
local absent = {}
for c = 1, n do
  if want[c] == '' and not got[c] then absent[#absent + 1] = checked[c] end
end
local some_exist = #absent > 0 and redis.call('EXISTS', unpack(absent)) > 0
local stale = {}
for c = 1, n do
  local key = checked[c]
  local v = got[c] or ''
  local same = v == want[c]
  if same and v == '' and some_exist then same = redis.call('EXISTS', key) == 0 end
  if not same then
    local data
    if kinds[c] == 'h' then data = redis.call('HVALS', key)
    else data = redis.call('SMEMBERS', key) end
    if v == '' and #data > 0 then
      v = next_version()
      redis.call('HSET', ver, key, v, LAST, v)
    elseif v ~= '' and #data == 0 then
      v = ''
      redis.call('HDEL', ver, key)
    end
    stale[#stale + 1] = c
    stale[#stale + 1] = v
    stale[#stale + 1] = data
  end
end
if #stale > 0 then return {'stale', t[1], t[2], stale} end
local bases = {0, 0}
for c = 1, 2 do
  local k = tonumber(ARGV[3 + c])
  if k > 0 then
    if c == 1 then
      local floor = tonumber(ARGV[7])
      if tonumber(redis.call('GET', KEYS[5]) or '0') < floor then
        redis.call('SET', KEYS[5], ARGV[7])
      end
    end
    bases[c] = redis.call('INCRBY', KEYS[4 + c], k) - k
  end
end
-- New versions first: should a command fail (the script stops there, keeping what it
-- wrote), no changed key keeps the version a replica may have cached.
local seq = '0'
local set, gone = {LAST, ''}, {}
for c = 1, n do
  if marks[c] == 'w' then
    set[#set + 1] = checked[c]
    set[#set + 1] = ''
  elseif marks[c] == 'e' then
    gone[#gone + 1] = checked[c]
  end
end
if #set + #gone > 2 then
  seq = next_version()
  for i = 2, #set, 2 do set[i] = seq end
  redis.call('HSET', ver, unpack(set))
  if #gone > 0 then redis.call('HDEL', ver, unpack(gone)) end
end
local filling = ARGV[4] ~= '0' or ARGV[5] ~= '0'
local function fill(c, k)
  return string.format('%d', bases[tonumber(c)] + tonumber(k))
end
local ids = {}
local w = cjson.decode(ARGV[9])
local i = 1
while i <= #w do
  local m = tonumber(w[i + 1])
  local cmd = {w[i], KEYS[tonumber(w[i + 2])]}
  for j = 1, m do
    local a = w[i + 2 + j]
    if filling and string.find(a, '\1', 1, true) then
      a = string.gsub(a, '\1(%d+):(%d+)\1', fill)
    end
    cmd[j + 2] = a
  end
  if cmd[1] == 'XADD' then
    ids[#ids + 1] = redis.call(unpack(cmd))
  else
    redis.call(unpack(cmd))
  end
  i = i + 3 + m
end
return {'ok', t[1], t[2], seq, bases, ids}
"""

#: Attach a store to its Redis data: the generation marker ``~epoch`` of the version hash.
#: KEYS: 1 the version hash, 2 the token counter. ARGV: 1 a new epoch, 2 the token floor.
#: Returns {epoch, created (1/0)}. When there is no epoch (a new store, or one that lost its
#: data) it writes ARGV 1 and raises the token counter to Redis time in microseconds (and at
#: least to the floor), so fencing tokens stay above every token handed out before, without
#: remembering any: one grant a microsecond, sustained, would be needed to catch up.
ATTACH = r"""
local e = redis.call('HGET', KEYS[1], '~epoch')
if e then return {e, 0} end
redis.call('HSET', KEYS[1], '~epoch', ARGV[1])
local t = redis.call('TIME')
local base = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), tonumber(ARGV[2]))
if tonumber(redis.call('GET', KEYS[2]) or '0') < base then
  redis.call('SET', KEYS[2], string.format('%d', base))
end
return {ARGV[1], 1}
"""


#: How many fixed keys come first in every ``CAS`` call's KEYS.
FIXED_KEYS = 6
