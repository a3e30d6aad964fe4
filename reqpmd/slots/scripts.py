"""Lua scripts of the build-slot limiter: one atomic script per state change.

Every script takes the same KEYS, in the order of ``keys.SlotKeys.as_list()``:

    KEYS[1] holders        ZSET  name -> lease expiry (ms on the Redis clock)
    KEYS[2] holder_info    HASH  name -> record
    KEYS[3] waiters        ZSET  name -> queue order: -priority * 2^42 + arrival seq
    KEYS[4] waiter_leases  ZSET  name -> waiter lease expiry (ms)
    KEYS[5] waiter_info    HASH  name -> record
    KEYS[6] meta           HASH  token, seq, run_id, grace_until
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
"""

from __future__ import annotations

from enum import IntEnum


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
    SNAPSHOT = 12  # SNAPSHOT: + now, grace_until, holders, waiters, cluster limit or -1
    COUNTS = 13  # COUNTS: + now, grace_until, holders, waiters, cluster limit or -1


# Highest priority magnitude the waiters' score packing allows: 1000 * 2^42 < 2^53.
MAX_PRIORITY = 1000

_CODES = ", ".join(f"{r.name} = {r.value:d}" for r in Reply)

_PRELUDE = (
    "local R = {"
    + _CODES
    + "}\n"
    + """
local H, HI, W, WL, WI, META, CHAN = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local grace_ms = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function record(owner, token, at, lease_ms, info)
  return string.format('%s %d %d %d ', owner, token, at, lease_ms) .. info
end

local function parse(rec)
  local owner, token, at, lease_ms = string.match(rec, '^(%S+) (%d+) (%d+) (%d+) ')
  return owner, tonumber(token), tonumber(at), tonumber(lease_ms)
end

local function grace_until()
  return tonumber(redis.call('HGET', META, 'grace_until') or '0')
end

-- The cluster-wide limit, when one was set (SET_LIMIT), wins over the caller's own.
local function limit(callers)
  return tonumber(redis.call('HGET', META, 'limit') or '') or callers
end

-- A new run_id means Redis restarted or failed over: holders may be missing.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
if redis.call('HGET', META, 'run_id') ~= run_id then
  redis.call('HSET', META, 'run_id', run_id,
             'grace_until', string.format('%d', now + grace_ms))
  -- keep fencing tokens increasing even if the counter was lost
  local floor = now * 1000
  if tonumber(redis.call('HGET', META, 'token') or '0') < floor then
    redis.call('HSET', META, 'token', string.format('%d', floor))
  end
end

local dead = redis.call('ZRANGEBYSCORE', H, '-inf', now)
if #dead > 0 then
  redis.call('ZREM', H, unpack(dead))
  redis.call('HDEL', HI, unpack(dead))
end
local gone = redis.call('ZRANGEBYSCORE', WL, '-inf', now)
if #gone > 0 then
  redis.call('ZREM', WL, unpack(gone))
  redis.call('ZREM', W, unpack(gone))
  redis.call('HDEL', WI, unpack(gone))
end

local function remove_waiter(name)
  redis.call('ZREM', W, name)
  redis.call('ZREM', WL, name)
  redis.call('HDEL', WI, name)
end

-- Grant free slots to the head of the queue and tell each new holder at once.
local function promote(max)
  if now < grace_until() then return end
  local count = redis.call('ZCARD', H)
  while count < max do
    local head = redis.call('ZRANGE', W, 0, 0)[1]
    if not head then break end
    local rec = redis.call('HGET', WI, head)
    remove_waiter(head)
    if rec then
      local owner, _, _, lease_ms = parse(rec)
      local info = string.match(rec, '^%S+ %d+ %d+ %d+ (.*)$')
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
  if first[2] then wake = tonumber(first[2]) - now end
  local g = grace_until() - now
  if g > 0 and (wake < 0 or g < wake) then wake = g end
  return wake
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

local held = redis.call('HGET', HI, name)
if held then
  local o, token = parse(held)
  if o ~= owner then return {R.IN_USE} end
  -- granted while we were not listening: the lease counts from now, as the caller's does
  redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
  return {R.GRANTED, token}
end
local queued = redis.call('HGET', WI, name)
if queued then
  if parse(queued) ~= owner then return {R.IN_USE} end
  redis.call('ZADD', WL, string.format('%d', now + lease_ms), name)
else
  local seq = redis.call('HINCRBY', META, 'seq', 1)
  redis.call('ZADD', W, string.format('%d', -priority * 4398046511104 + seq), name)
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
  local queued = redis.call('HGET', WI, name)
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
-- ARGV: 2 name, 3 owner, 4 token, 5 lease_ms, 6 info json, 7 acquired_at ms
-- Extend the holder's lease. After a Redis restart (inside the grace period) a holder
-- missing from Redis re-registers with its old token.
-- Returns {RENEWED, 0|1} | {LOST}
local name, owner, token = ARGV[2], ARGV[3], tonumber(ARGV[4])
local lease_ms, info, acquired_at = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local held = redis.call('HGET', HI, name)
if held then
  if parse(held) ~= owner then return {R.LOST} end
  redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
  return {R.RENEWED, 0}
end
if now < grace_until() then
  remove_waiter(name)
  redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
  redis.call('HSET', HI, name, record(owner, token, acquired_at, lease_ms, info))
  if tonumber(redis.call('HGET', META, 'token') or '0') < token then
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
-- ARGV: 2 limit (>= 1), or 0 to drop the cluster-wide limit (callers' own then apply)
-- Set the limit every caller of the namespace obeys; a raised limit is served at once.
-- Returns {LIMIT_SET, the previous cluster limit or -1}
local previous = limit(-1)
local new = tonumber(ARGV[2])
if new > 0 then
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
--          {name, lease_expiry, record, ...}, cluster limit or -1}, waiters in queue order.
-- Costs O(holders + waiters): for listings; scalar reads use COUNTS.
local function dump(zset, hash)
  local out = {}
  local names = redis.call('ZRANGE', zset, 0, -1)
  for _, name in ipairs(names) do
    local exp = redis.call('ZSCORE', zset == W and WL or zset, name)
    table.insert(out, name)
    table.insert(out, exp or '0')
    table.insert(out, redis.call('HGET', hash, name) or '')
  end
  return out
end
return {R.SNAPSHOT, now, grace_until(), dump(H, HI), dump(W, WI), limit(-1)}
"""
)

COUNTS = (
    _PRELUDE
    + """
-- ARGV: only the grace
-- The cheap read behind health checks and scalar getters: O(1) replies, whatever the queue.
-- Returns {COUNTS, now, grace_until, holders, waiters, cluster limit or -1}
return {R.COUNTS, now, grace_until(), redis.call('ZCARD', H), redis.call('ZCARD', W), limit(-1)}
"""
)
