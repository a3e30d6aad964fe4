"""Lua scripts of the build-slot limiter: one atomic script per state change.

Every script takes the same KEYS, in the order of ``keys.SlotKeys.as_list()``:

    KEYS[1] holders        ZSET  name -> lease expiry (ms on the Redis clock)
    KEYS[2] holder_info    HASH  name -> record
    KEYS[3] waiters        ZSET  name -> queue order: -priority * 2^42 + arrival seq
    KEYS[4] waiter_leases  ZSET  name -> waiter lease expiry (ms)
    KEYS[5] waiter_info    HASH  name -> record
    KEYS[6] meta           HASH  token, seq, run_id, grace_until, limit, repaired
    KEYS[7] grants         pub/sub channel (passed here so no name is built in Lua)

and ARGV[1] = restart grace in ms. Every script replies with a list whose first element is
a ``Reply`` code; the Lua side reads the codes by name (``R.GRANTED``) from a table
generated from the enum, so Python and Lua cannot drift apart.

A record is "owner token t lease_ms json": the owner
(a random id per acquisition), the fencing token (0 while waiting), the time it was
granted or queued (ms), its lease length and the caller's JSON. Numbers are formatted
with %d because Lua's own tostring would round tokens above 1e14.

Time is the Redis server's (TIME), so leases mean the same on every host. Before any
change a script reaps expired holders and waiters, and notices a server restart (a new
run_id: data may be lost or stale); from then on, for one grace period, it grants
nothing new while surviving holders re-register through RENEW.

Whatever a script reads is untrusted (anyone with access to Redis can write anything),
and one bad value must not stop every caller of the namespace. So the prelude drops a
key of the wrong type (a lost holders key also starts a grace), repairs counters that do
not parse (the token restarts from the clock, so tokens still only grow; a bad grace end
becomes one grace from now), treats a holder whose record does not parse as dead and a
waiter's as gone, and cuts a lease back to its record's length. A cluster limit outside
``LIMIT_MIN..LIMIT_MAX`` is ignored (each caller's own applies) and reported by COUNTS
and SNAPSHOT, as is the last repair (meta's ``repaired``: "<ms> <what>"), which the
Python side logs once.
"""

from __future__ import annotations

from enum import IntEnum

from reqpmd.config.schema import FIELDS


class Reply(IntEnum):
    """First element of every script's reply; each script's header names its codes."""

    GRANTED = 0  # ACQUIRE: + token
    WAITING = 1  # ACQUIRE: + position (1 = next), active, ms until worth polling, grace left ms
    BUSY = 2  # ACQUIRE (try-only): + active count, ms until worth polling again
    IN_USE = 3  # ACQUIRE: the name is held or awaited by another owner
    RENEWED = 4  # RENEW: + 1 if the holder re-registered after a Redis restart, else 0
    LOST = 5  # RENEW: the holder no longer holds the slot
    FREED = 6  # RELEASE: the holder's slot was freed
    WITHDRAWN = 7  # RELEASE: the waiter left the queue
    UNKNOWN = 8  # RELEASE: nobody (of that owner) holds or awaits the name
    CLEARED = 9  # CLEAR: + how many slots were freed
    GRACE_ENDED = 10  # END_GRACE
    LIMIT_SET = 11  # SET_LIMIT: + the previous cluster limit, or -1
    # SNAPSHOT and COUNTS: + now, grace_until, holders, waiters, cluster limit or -1,
    # an invalid cluster limit found or nil, the last repair or nil
    SNAPSHOT = 12
    COUNTS = 13


# Highest priority magnitude the waiters' score packing allows: 1000 * 2^42 < 2^53.
MAX_PRIORITY = 1000

_CODES = ", ".join(f"{r.name} = {r.value:d}" for r in Reply)

# The range of a cluster-wide limit: the bounds of the max_concurrent_builds setting.
_LIMIT_RULE = next(f for f in FIELDS if f.name == "max_concurrent_builds")
assert _LIMIT_RULE.lo is not None and _LIMIT_RULE.hi is not None
LIMIT_MIN, LIMIT_MAX = int(_LIMIT_RULE.lo), int(_LIMIT_RULE.hi)

# The longest bad value (a name, a limit) a script quotes back in a note.
QUOTE_MAX = 64

_PRELUDE = (
    "local R = {"
    + _CODES
    + "}\n"
    + f"local LIMIT_MIN, LIMIT_MAX, QUOTE_MAX = {LIMIT_MIN:d}, {LIMIT_MAX:d}, {QUOTE_MAX:d}\n"
    + """
local H, HI, W, WL, WI, META, CHAN = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local grace_ms = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Everything read from Redis is untrusted: a value these scripts did not write (a typo
-- in redis-cli, a half-restored dump, a bug elsewhere) is repaired or ignored, never
-- obeyed and never a reason to fail, or every caller of the namespace would fail with it.

-- A count, time or token as these scripts write it: decimal digits, exact in a double.
local function uint(s)
  if type(s) ~= 'string' or #s > 16 or not string.match(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n > 9007199254740991 then return nil end
  return n
end

local function quote(s)
  return string.format('%q', string.sub(s, 1, QUOTE_MAX))
end

-- Say what was repaired where every caller reads it (COUNTS, SNAPSHOT): they log it.
local repairs = {}
local function repaired(what)
  table.insert(repairs, what)
  redis.call('HSET', META, 'repaired', string.format('%d ', now) .. table.concat(repairs, '; '))
end

local function record(owner, token, at, lease_ms, info)
  return string.format('%s %d %d %d ', owner, token, at, lease_ms) .. info
end

-- owner, token, at, lease_ms, info of a record; nothing at all when it does not parse.
local function parse(rec)
  if type(rec) ~= 'string' then return nil end
  local owner, token, at, lease_ms, info = string.match(rec, '^(%S+) (%d+) (%d+) (%d+) (.*)$')
  token, at, lease_ms = uint(token), uint(at), uint(lease_ms)
  if not (owner and token and at and lease_ms and lease_ms > 0) then return nil end
  return owner, token, at, lease_ms, info
end

-- Delete in slices: unpack() of a long list overflows Lua's stack.
local function remove_all(cmd, key, names)
  for i = 1, #names, 1000 do
    redis.call(cmd, key, unpack(names, i, math.min(i + 999, #names)))
  end
end

-- A key of the wrong type (a string where a hash belongs) fails every command on it:
-- drop it. Holders may be missing then, so no grant for one grace, as after a restart.
local lost_holders = false
local kinds = {{H, 'zset'}, {HI, 'hash'}, {W, 'zset'}, {WL, 'zset'}, {WI, 'hash'},
               {META, 'hash'}}
local dropped = {}
for _, k in ipairs(kinds) do
  local kind = redis.call('TYPE', k[1])['ok']
  if kind ~= 'none' and kind ~= k[2] then
    redis.call('DEL', k[1])
    table.insert(dropped, string.format('%s (a %s, not a %s)', k[1], kind, k[2]))
    if k[1] ~= W and k[1] ~= WL and k[1] ~= WI then lost_holders = true end
  end
end

-- A new run_id means Redis restarted or failed over: holders may be missing.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local floor = now * 1000  -- the lowest token after a restart: the time in microseconds
if redis.call('HGET', META, 'run_id') ~= run_id then
  redis.call('HSET', META, 'run_id', run_id,
             'grace_until', string.format('%d', now + grace_ms))
  -- keep fencing tokens increasing even if the counter was lost
  if (uint(redis.call('HGET', META, 'token')) or 0) < floor then
    redis.call('HSET', META, 'token', string.format('%d', floor))
  end
end
if #dropped > 0 then
  repaired('deleted ' .. table.concat(dropped, ', '))
end
if lost_holders then
  local g = uint(redis.call('HGET', META, 'grace_until')) or 0
  if g < now + grace_ms then
    redis.call('HSET', META, 'grace_until', string.format('%d', now + grace_ms))
  end
end

-- The counters: a bad token restarts from the clock (tokens still only grow), a bad
-- grace end becomes one grace from now (the cautious reading), a bad queue counter the
-- clock in ms (later than any count so far, below 2^42: the queue order keeps).
local m = redis.call('HMGET', META, 'token', 'grace_until', 'seq')
if m[1] and not uint(m[1]) then
  redis.call('HSET', META, 'token', string.format('%d', floor))
  repaired('reset the token counter ' .. quote(m[1]) .. ' to the clock')
end
if m[2] and not uint(m[2]) then
  redis.call('HSET', META, 'grace_until', string.format('%d', now + grace_ms))
  repaired('restarted the grace: its end was ' .. quote(m[2]))
end
if m[3] and not (uint(m[3]) and uint(m[3]) < 4398046511104) then
  redis.call('HSET', META, 'seq', string.format('%d', now))
  repaired('reset the queue counter ' .. quote(m[3]) .. ' to the clock')
end

local function grace_until()
  return uint(redis.call('HGET', META, 'grace_until')) or 0
end

-- The cluster-wide limit when one was set (SET_LIMIT) and is valid, else nil and the
-- value found (false when there is none): an invalid one is ignored, and shown.
local function cluster_limit()
  local v = redis.call('HGET', META, 'limit')
  local n = uint(v)
  if n and n >= LIMIT_MIN and n <= LIMIT_MAX then return n, false end
  return nil, v and string.sub(v, 1, QUOTE_MAX)
end

-- The cluster-wide limit, when there is a valid one, wins over the caller's own.
local function limit(callers)
  return (cluster_limit()) or callers
end

local dead = redis.call('ZRANGEBYSCORE', H, '-inf', now)
if #dead > 0 then
  remove_all('ZREM', H, dead)
  remove_all('HDEL', HI, dead)
end
local gone = redis.call('ZRANGEBYSCORE', WL, '-inf', now)
if #gone > 0 then
  remove_all('ZREM', WL, gone)
  remove_all('ZREM', W, gone)
  remove_all('HDEL', WI, gone)
end

-- A holder without a record that parses is dead (else it pins a slot for good), a
-- lease longer than its record says is cut back, a record without a lease is dropped:
-- the limit counts real holders only. O(holders), and holders are few.
do
  local flat = redis.call('ZRANGE', H, 0, -1, 'WITHSCORES')
  local bad = {}
  for i = 1, #flat, 2 do
    local name, expiry = flat[i], tonumber(flat[i + 1])
    local owner, _, _, lease_ms = parse(redis.call('HGET', HI, name))
    if not owner then
      table.insert(bad, name)
    elseif expiry > now + lease_ms then
      redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
    end
  end
  if #bad > 0 then
    remove_all('ZREM', H, bad)
    remove_all('HDEL', HI, bad)
    repaired(string.format('removed %d holder(s) whose record is missing or does not parse: %s',
                           #bad, quote(bad[1])))
  end
  if redis.call('HLEN', HI) > redis.call('ZCARD', H) then
    local orphans = {}
    for _, name in ipairs(redis.call('HKEYS', HI)) do
      if not redis.call('ZSCORE', H, name) then table.insert(orphans, name) end
    end
    remove_all('HDEL', HI, orphans)
    repaired(string.format('removed %d holder record(s) without a lease: %s',
                           #orphans, quote(orphans[1])))
  end
end

local function remove_waiter(name)
  redis.call('ZREM', W, name)
  redis.call('ZREM', WL, name)
  redis.call('HDEL', WI, name)
end

-- The record of the live waiter ``name``, or nil. A record that does not parse, or
-- has no lease (nothing would ever reap it), is removed; a lease longer than its record
-- says is cut back.
local function waiter(name)
  local rec = redis.call('HGET', WI, name)
  if not rec then return nil end
  local owner, _, _, lease_ms = parse(rec)
  local expiry = tonumber(redis.call('ZSCORE', WL, name))
  if not (owner and expiry) then
    remove_waiter(name)
    repaired('removed waiter ' .. quote(name) .. ': its record does not parse or has no lease')
    return nil
  end
  if expiry > now + lease_ms then
    redis.call('ZADD', WL, string.format('%d', now + lease_ms), name)
  end
  return rec
end

-- Grant free slots to the head of the queue and tell each new holder at once.
local function promote(max)
  if now < grace_until() then return end
  local count = redis.call('ZCARD', H)
  while count < max do
    local head = redis.call('ZRANGE', W, 0, 0)[1]
    if not head then break end
    local owner, _, _, lease_ms, info = parse(redis.call('HGET', WI, head))
    remove_waiter(head)
    if not owner then
      repaired('removed waiter ' .. quote(head) .. ': its record is missing or does not parse')
    elseif redis.call('ZSCORE', H, head) then
      repaired('removed waiter ' .. quote(head) .. ': the name is held')
    else
      local token = redis.call('HINCRBY', META, 'token', 1)
      redis.call('ZADD', H, string.format('%d', now + lease_ms), head)
      redis.call('HSET', HI, head, record(owner, token, now, lease_ms, info))
      redis.call('PUBLISH', CHAN, string.format('%s %s %d', head, owner, token))
      count = count + 1
    end
  end
end

-- Milliseconds until the state can change without anyone telling the waiters:
-- the earliest holder lease expiry, or the end of a restart grace period.
local function wake_ms()
  local wake = -1
  local first = redis.call('ZRANGE', H, 0, 0, 'WITHSCORES')
  if first[2] then wake = math.max(0, tonumber(first[2]) - now) end
  local g = grace_until() - now
  if g > 0 and (wake < 0 or g < wake) then wake = g end
  return wake
end

-- What every reader is told besides its answer: an invalid cluster limit found (or
-- false) and the last repair, "<ms> <what>" (or false).
local function notes()
  local _, bad_limit = cluster_limit()
  return bad_limit, redis.call('HGET', META, 'repaired')
end
"""
)

ACQUIRE = (
    _PRELUDE
    + """
-- ARGV: 2 name, 3 owner, 4 priority, 5 max, 6 lease_ms, 7 info json, 8 try_only (0|1)
-- Enqueue the caller (or refresh its waiter lease), grant what the limit allows.
-- Returns {GRANTED, token} | {WAITING, position, active, wake_ms, grace_left_ms}
--       | {BUSY, active, wake_ms} | {IN_USE}
local name, owner, priority = ARGV[2], ARGV[3], tonumber(ARGV[4])
local max, lease_ms, info, try_only = limit(tonumber(ARGV[5])), tonumber(ARGV[6]), ARGV[7], ARGV[8]

local function enqueue()
  local seq = redis.call('HINCRBY', META, 'seq', 1)
  redis.call('ZADD', W, string.format('%d', -priority * 4398046511104 + seq), name)
end

local held = redis.call('HGET', HI, name)  -- the prelude left only records that parse
if held then
  local o, token = parse(held)
  if o ~= owner then return {R.IN_USE} end
  -- granted while we were not listening: the lease counts from now, as the caller's does
  redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
  return {R.GRANTED, token}
end
local queued = waiter(name)
if queued then
  if parse(queued) ~= owner then return {R.IN_USE} end
  redis.call('ZADD', WL, string.format('%d', now + lease_ms), name)
  if not redis.call('ZSCORE', W, name) then
    enqueue()  -- it lost its place in the queue (a foreign write): queue again
    repaired('queued waiter ' .. quote(name) .. ' again: it was missing from the queue')
  end
else
  enqueue()
  redis.call('ZADD', WL, string.format('%d', now + lease_ms), name)
  redis.call('HSET', WI, name, record(owner, 0, now, lease_ms, info))
end
promote(max)
held = redis.call('HGET', HI, name)
if held then
  local _, token = parse(held)
  return {R.GRANTED, token}
end
if try_only == '1' then
  remove_waiter(name)
  return {R.BUSY, redis.call('ZCARD', H), wake_ms()}
end
return {R.WAITING, redis.call('ZRANK', W, name) + 1, redis.call('ZCARD', H), wake_ms(),
        math.max(0, grace_until() - now)}
"""
)

RELEASE = (
    _PRELUDE
    + """
-- ARGV: 2 name, 3 owner ('' = whoever holds or awaits it), 4 max
-- Free the holder's slot or withdraw the waiter, then hand free slots to the queue.
-- Returns {FREED} | {WITHDRAWN} | {UNKNOWN}
local name, owner, max = ARGV[2], ARGV[3], limit(tonumber(ARGV[4]))
local result = R.UNKNOWN
local held = redis.call('HGET', HI, name)
if held and (owner == '' or parse(held) == owner) then
  redis.call('ZREM', H, name)
  redis.call('HDEL', HI, name)
  result = R.FREED
else
  local queued = waiter(name)
  if queued and (owner == '' or parse(queued) == owner) then
    remove_waiter(name)
    result = R.WITHDRAWN
  end
end
promote(max)
return {result}
"""
)

RENEW = (
    _PRELUDE
    + """
-- ARGV: 2 name, 3 owner, 4 token, 5 lease_ms, 6 info json, 7 acquired_at ms, 8 max
-- Extend the holder's lease. After a Redis restart (inside the grace period) a holder
-- missing from Redis re-registers with its old token, while the limit has room: holders
-- lost to a foreign write may have been replaced already.
-- Returns {RENEWED, 0|1} | {LOST}
local name, owner, token = ARGV[2], ARGV[3], tonumber(ARGV[4])
local lease_ms, info, acquired_at = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local max = limit(tonumber(ARGV[8]))
local held = redis.call('HGET', HI, name)
if held then
  if parse(held) ~= owner then return {R.LOST} end
  redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
  return {R.RENEWED, 0}
end
if now < grace_until() and redis.call('ZCARD', H) < max then
  remove_waiter(name)
  redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
  redis.call('HSET', HI, name, record(owner, token, acquired_at, lease_ms, info))
  if (uint(redis.call('HGET', META, 'token')) or 0) < token then
    redis.call('HSET', META, 'token', string.format('%d', token))
  end
  return {R.RENEWED, 1}
end
return {R.LOST}
"""
)

CLEAR = (
    _PRELUDE
    + """
-- ARGV: 2 max
-- Free every held slot (an operator's last resort), then serve the queue.
-- Returns {CLEARED, number of slots freed}
local n = redis.call('ZCARD', H)
redis.call('DEL', H, HI)
promote(limit(tonumber(ARGV[2])))
return {R.CLEARED, n}
"""
)

END_GRACE = (
    _PRELUDE
    + """
-- ARGV: 2 max
-- The caller vouches that no holder is missing from Redis (e.g. a private server it
-- has just started): end any restart grace period now, and serve the queue at once.
-- Returns {GRACE_ENDED}
redis.call('HSET', META, 'grace_until', '0')
promote(limit(tonumber(ARGV[2])))
return {R.GRACE_ENDED}
"""
)

SET_LIMIT = (
    _PRELUDE
    + """
-- ARGV: 2 limit (LIMIT_MIN..LIMIT_MAX), or 0 to drop the cluster-wide limit (callers'
-- own then apply). Set the limit every caller of the namespace obeys; a raised limit is
-- served at once. Returns {LIMIT_SET, the previous valid cluster limit or -1}
local previous = limit(-1)
local new = tonumber(ARGV[2])
if new >= LIMIT_MIN and new <= LIMIT_MAX then
  redis.call('HSET', META, 'limit', string.format('%d', new))
  promote(new)
else
  redis.call('HDEL', META, 'limit')
end
return {R.LIMIT_SET, previous}
"""
)

SNAPSHOT = (
    _PRELUDE
    + """
-- ARGV: only the grace
-- Returns {SNAPSHOT, now, grace_until, {name, lease_expiry, record, ...},
--          {name, lease_expiry, record, ...}, cluster limit or -1,
--          invalid cluster limit found or nil, last repair or nil}, waiters in queue order.
-- Costs O(holders + waiters): for listings; scalar reads use COUNTS.
local holders = {}
for _, name in ipairs(redis.call('ZRANGE', H, 0, -1)) do
  table.insert(holders, name)
  table.insert(holders, redis.call('ZSCORE', H, name))
  table.insert(holders, redis.call('HGET', HI, name))
end
local waiters = {}
for _, name in ipairs(redis.call('ZRANGE', W, 0, -1)) do
  local rec = waiter(name)
  if not rec then
    remove_waiter(name)  -- a place in the queue without a record: nobody waits there
  else
    table.insert(waiters, name)
    table.insert(waiters, redis.call('ZSCORE', WL, name) or '0')
    table.insert(waiters, rec)
  end
end
local bad_limit, repair = notes()
return {R.SNAPSHOT, now, grace_until(), holders, waiters, limit(-1), bad_limit, repair}
"""
)

COUNTS = (
    _PRELUDE
    + """
-- ARGV: only the grace
-- The cheap read behind health checks and scalar getters: O(holders), whatever the queue.
-- Returns {COUNTS, now, grace_until, holders, waiters, cluster limit or -1,
--          invalid cluster limit found or nil, last repair or nil}
local bad_limit, repair = notes()
return {R.COUNTS, now, grace_until(), redis.call('ZCARD', H), redis.call('ZCARD', W), limit(-1),
        bad_limit, repair}
"""
)
