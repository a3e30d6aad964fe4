"""Lua scripts of the build-slot limiter: one atomic script per state change.

Every script takes the same KEYS, in the order of ``keys.SlotKeys.as_list()``:

    KEYS[1] holders        ZSET  name -> lease expiry (ms on the Redis clock)
    KEYS[2] holder_info    HASH  name -> record
    KEYS[3] waiters        ZSET  name -> queue order: -priority * 2^42 + arrival seq
    KEYS[4] waiter_leases  ZSET  name -> waiter lease expiry (ms)
    KEYS[5] waiter_info    HASH  name -> record
    KEYS[6] meta           HASH  token, seq, run_id, grace_until, limit, repaired
    KEYS[7] grants         pub/sub channel (passed here so no name is built in Lua)
    KEYS[8] group_queue    ZSET  "<group> <order> <name>" -> 0: each group's queue, by lex
    KEYS[9] ready          ZSET  group -> start tag: groups with waiters, under their cap
    KEYS[10] parked        ZSET  group -> start tag: groups with waiters, at their cap
    KEYS[11] shares        HASH  group -> "<max_concurrent> <weight>" (absent: no cap, 1)
    KEYS[12] idle          ZSET  group -> the tag a group without waiters left with, kept
                                 while it is ahead of the virtual time

and ARGV[1] = restart grace in ms. Every script replies with a list whose first element is
a ``Reply`` code; the Lua side reads the codes by name (``R.GRANTED``) from a table
generated from the enum, so Python and Lua cannot drift apart.

A record is "owner token t lease_ms json": the owner
(a random id per acquisition), the fencing token (0 while waiting), the time it was
granted or queued (ms), its lease length and the caller's JSON. Numbers are formatted
with %d because Lua's own tostring would round tokens above 1e14.

Fair share. Every waiter belongs to a group (a project; reqpmd puts builds without one in
a group per submitting user), named in its record's JSON. A group may have a cap (at most
that many holders at once) and a weight. Free slots go to groups by start-time fair
queueing (SFQ): each group with waiters carries a start tag in virtual time; a grant goes
to the group with the lowest tag (ties: by name), whose tag then grows by SCALE // weight,
and the virtual time becomes the tag served. A group that starts waiting starts at the
virtual time, ahead of every group served since, or at the tag it left with if that is
later (it had more than its share just before: ``idle`` keeps such tags, so leaving and
coming back buys nothing). Between two grants to a group of weight w that keeps waiting,
a group of weight w' is granted at most floor(w'/w) + 1 times. Within a group, priority
then arrival order (the order key: -priority * 2^42 + arrival seq, offset to be
non-negative and zero-padded, so lex order is queue order).

A group at its cap leaves ``ready`` for ``parked`` when it reaches the front, so it never
blocks the groups behind it; it returns when one of its holders goes (release, reaping,
clear), its cap is raised, or one of its waiters refreshes and finds it under its cap. It
returns at max(virtual time, its tag): the slot its own build freed is its unless the
share owes it to a group that has had less. A grant costs O(log waiters + log groups): the
front group is ZRANGE 0 0 of ``ready``, its head waiter one ZRANGEBYLEX, and a group
leaves ``ready`` as its last waiter goes. ``group_queue`` is an index: an entry whose
waiter is gone or moved is dropped when met; a waiter refreshing its lease puts itself
back, and when ``waiters`` counts more than the index (waiters queued by an earlier
release) every waiter is put back once. Data left by other writers heals itself.

Why SFQ and not deficit round robin: DRR serves groups in a fixed rotation, so a project
that starts waiting queues behind a whole round of the others' quanta; SFQ serves it next.
Both cost O(1)/O(log) per grant; SFQ also takes weight changes without rebuilding rounds.

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
    SHARE_SET = 14  # SET_SHARE: + the previous cap (0: none) and weight, then the new ones


from reqpmd.slots.keys import MAX_PRIORITY as MAX_PRIORITY  # noqa: E402 - re-exported

_CODES = ", ".join(f"{r.name} = {r.value:d}" for r in Reply)

# The range of a cluster-wide limit: the bounds of the max_concurrent_builds setting.
_LIMIT_RULE = next(f for f in FIELDS if f.name == "max_concurrent_builds")
assert _LIMIT_RULE.lo is not None and _LIMIT_RULE.hi is not None
LIMIT_MIN, LIMIT_MAX = int(_LIMIT_RULE.lo), int(_LIMIT_RULE.hi)

# The longest bad value (a name, a limit) a script quotes back in a note.
QUOTE_MAX = 64

# The group of a waiter that names none (and of records other writers left): it gets the
# default share, like any group without one.
DEFAULT_GROUP = "@default"  # no project can be named so
# Group names: what project names allow, plus '@' and '~' for reqpmd's own groups.
GROUP_CHARS = "A-Za-z0-9._@~-"
GROUP_MAX = 64
WEIGHT_MAX = 100
# Virtual time one grant costs a group of weight 1 (weight w: SCALE // w). Tags stay
# integers; 2^53 / SCALE = 9e9 grants at weight 1 before they lose exactness.
SCALE = 1_000_000

_PRELUDE = (
    "local R = {"
    + _CODES
    + "}\n"
    + f"local LIMIT_MIN, LIMIT_MAX, QUOTE_MAX = {LIMIT_MIN:d}, {LIMIT_MAX:d}, {QUOTE_MAX:d}\n"
    + f"local DEFAULT_GROUP, GROUP_MAX = '{DEFAULT_GROUP}', {GROUP_MAX:d}\n"
    + f"local WEIGHT_MAX, SCALE, MAX_PRIORITY = {WEIGHT_MAX:d}, {SCALE:d}, {MAX_PRIORITY:d}\n"
    + f"local GROUP_PATTERN = '^[{GROUP_CHARS}]+$'\n"
    + """
local H, HI, W, WL, WI, META, CHAN = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local GQ, READY, PARKED, SHARES, IDLE = KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local grace_ms = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Everything read from Redis is untrusted: a value these scripts did not write (a typo
-- in redis-cli, a half-restored dump, a bug elsewhere) is repaired or ignored, never
-- obeyed and never a reason to fail, or every caller of the namespace would fail with it.

-- A count, time or token as these scripts write it: decimal digits, exact in a double.
local EXACT_MAX = 9007199254740991  -- 2^53 - 1
local function uint(s)
  if type(s) ~= 'string' or #s > 16 or not string.match(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n > EXACT_MAX then return nil end
  return n
end

local function quote(s)
  return string.format('%q', string.sub(s, 1, QUOTE_MAX))
end

-- Say what was repaired where every caller reads it (COUNTS, SNAPSHOT): they log it.
-- The first few repairs of a call, and how many more: one call meeting thousands of bad
-- values must not rewrite a growing note thousands of times.
local repairs, more_repairs = {}, 0
local function repaired(what)
  if #repairs < 5 then table.insert(repairs, what) else more_repairs = more_repairs + 1 end
  local note = table.concat(repairs, '; ')
  if more_repairs > 0 then note = note .. string.format('; and %d more', more_repairs) end
  redis.call('HSET', META, 'repaired', string.format('%d ', now) .. note)
end

local function record(owner, token, at, lease_ms, info)
  return string.format('%s %d %d %d ', owner, token, at, lease_ms) .. info
end

-- owner, token, at, lease_ms, info of a record; nothing at all when it does not parse.
-- The numbers as uint() reads them, without its match: the pattern has checked the
-- digits (every call parses every holder's record).
local function parse(rec)
  if type(rec) ~= 'string' then return nil end
  local owner, token, at, lease_ms, info = string.match(rec, '^(%S+) (%d+) (%d+) (%d+) (.*)$')
  if not owner or #token > 16 or #at > 16 or #lease_ms > 16 then return nil end
  token, at, lease_ms = tonumber(token), tonumber(at), tonumber(lease_ms)
  if token > EXACT_MAX or at > EXACT_MAX or lease_ms > EXACT_MAX or lease_ms == 0 then
    return nil
  end
  return owner, token, at, lease_ms, info
end

-- The group a record's JSON names, or DEFAULT_GROUP when it names none that is valid.
-- The limiter writes it first ('{"group":"p",...'): read that without decoding the JSON
-- (counting holders by group reads every holder's), and decode only what another writer
-- wrote.
local function group_of(info)
  local fast = string.match(info or '', '^{"group":"([^"]*)"')
  if fast and #fast <= GROUP_MAX and string.match(fast, GROUP_PATTERN) then return fast end
  local ok, v = pcall(cjson.decode, info or '')
  if ok and type(v) == 'table' then
    local g = v['group']
    if type(g) == 'string' and #g <= GROUP_MAX and string.match(g, GROUP_PATTERN) then
      return g
    end
  end
  return DEFAULT_GROUP
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
-- key, type, key, type...: flat, not a table per key made at every call
local kinds = {H, 'zset', HI, 'hash', W, 'zset', WL, 'zset', WI, 'hash', META, 'hash',
               GQ, 'zset', READY, 'zset', PARKED, 'zset', SHARES, 'hash', IDLE, 'zset'}
local dropped = {}
for i = 1, #kinds, 2 do
  local key, want = kinds[i], kinds[i + 1]
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= want then
    redis.call('DEL', key)
    table.insert(dropped, string.format('%s (a %s, not a %s)', key, kind, want))
    if key == H or key == HI or key == META then lost_holders = true end
  end
end

-- A new run_id means Redis restarted or failed over: holders may be missing.
-- string.match(info, 'run_id:(%w+)') found by a plain find: a pattern search tries every
-- position of INFO's kilobyte.
local function run_id_of(info)
  local from = 1
  while true do
    local at, last = string.find(info, 'run_id:', from, true)
    if not at then return nil end
    local id = string.match(info, '^%w+', last + 1)
    if id then return id end
    from = at + 1
  end
end
local run_id = run_id_of(redis.call('INFO', 'server'))
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

-- The share of a group: its cap (0: none) and weight. One that does not parse is
-- dropped (the default share applies) and reported.
local function share(g)
  local v = redis.call('HGET', SHARES, g)
  if not v then return 0, 1 end
  local cap, weight = string.match(v, '^(%d+) (%d+)$')
  cap, weight = uint(cap), uint(weight)
  if cap and weight and cap <= LIMIT_MAX and weight >= 1 and weight <= WEIGHT_MAX
     and string.format('%d %d', cap, weight) == v then  -- as SET_SHARE writes it, only
    return cap, weight
  end
  redis.call('HDEL', SHARES, g)
  repaired('dropped the share of ' .. quote(g) .. ', ' .. quote(v) .. ': not "<cap> <weight>"')
  return 0, 1
end

-- A start tag as these scripts write it: an integer up to TAG_MAX, far enough below 2^53
-- that tag + SCALE stays exact (2^50 / SCALE: a billion grants at weight 1); else nil.
local TAG_MAX = 1125899906842624
local function tag_of(score)
  local n = tonumber(score)
  if n and n >= 0 and n <= TAG_MAX then return math.floor(n) end
  return nil
end

-- The virtual time: the start tag of the last grant. Missing (a new namespace, or meta
-- lost), it starts from the lowest tag waiting. Bad or past TAG_MAX, every group's tag
-- restarts from 0 with it: the order of one round is lost, nobody is starved.
local vtime_now
local function vtime()
  if vtime_now then return vtime_now end
  local v = redis.call('HGET', META, 'vtime')
  vtime_now = uint(v)
  if vtime_now and vtime_now > TAG_MAX then vtime_now = nil end
  if not vtime_now then
    vtime_now = 0
    if not v then
      vtime_now = tag_of(redis.call('ZRANGE', READY, 0, 0, 'WITHSCORES')[2]) or 0
    else
      for _, key in ipairs({READY, PARKED}) do
        for _, g in ipairs(redis.call('ZRANGE', key, 0, -1)) do redis.call('ZADD', key, 0, g) end
      end
      redis.call('DEL', IDLE)
      repaired('reset the virtual time ' .. quote(v) .. " and every group's tag to 0")
    end
    redis.call('HSET', META, 'vtime', string.format('%d', vtime_now))
  end
  return vtime_now
end

-- A waiter's entry in its group's queue: the order key, offset to be non-negative and
-- zero-padded, sorts by lex as the score sorts.
local ORDER_OFFSET = MAX_PRIORITY * 4398046511104
local function entry(g, score, name)
  return g .. ' ' .. string.format('%016.0f', tonumber(score) + ORDER_OFFSET) .. ' ' .. name
end

local function has_waiters(g)
  return redis.call('ZRANGEBYLEX', GQ, '[' .. g .. ' ', '(' .. g .. '!', 'LIMIT', 0, 1)[1] ~= nil
end

-- A group without waiters leaves the sharing. It keeps its tag (in ``idle``) while that
-- is ahead of the virtual time, so leaving and coming back buys nothing (SFQ's start tag
-- max(V, F)); a tag at or behind the virtual time is forgotten.
local function leave(g, tag)
  redis.call('ZREM', READY, g)
  redis.call('ZREM', PARKED, g)
  if tag and tag > vtime() then redis.call('ZADD', IDLE, string.format('%d', tag), g) end
end

-- ``keep_group``: the caller (a grant) places the group itself.
local function remove_waiter(name, keep_group)
  local rec, score = redis.call('HGET', WI, name), redis.call('ZSCORE', W, name)
  local g
  if rec and score then
    g = group_of(select(5, parse(rec)))
    redis.call('ZREM', GQ, entry(g, score, name))
  end
  redis.call('ZREM', W, name)
  redis.call('ZREM', WL, name)
  redis.call('HDEL', WI, name)
  if g and not keep_group and not has_waiters(g) then
    leave(g, tag_of(redis.call('ZSCORE', READY, g) or redis.call('ZSCORE', PARKED, g)))
  end
end

-- Holders per group, counted from the records at each call (holders are few), so no
-- counter can drift: the caps count real holders only. Counted at the first question,
-- from the JSON of each live holder the check below finds (no question comes before it):
-- most calls (COUNTS, a renewal, a waiter's refresh) ask none, and group_of() on every
-- holder was a tenth of their cost.
local holder_infos, held_by = {}, nil
local function holders_by_group()
  if not held_by then
    held_by = {}
    for _, info in ipairs(holder_infos) do
      local g = group_of(info)
      held_by[g] = (held_by[g] or 0) + 1
    end
  end
  return held_by
end

local function count_holder(g, n)
  local by = holders_by_group()
  by[g] = (by[g] or 0) + n
end

-- Whether group g holds as many slots as its cap allows (``cap``: share(g)'s first value).
local function full(g, cap)
  return cap > 0 and (holders_by_group()[g] or 0) >= cap
end

local function at_cap(g)
  return full(g, (share(g)))
end

-- A group at its cap comes back to ``ready`` once under it.
local function unpark(g)
  local tag = redis.call('ZSCORE', PARKED, g)
  if tag and not at_cap(g) then
    redis.call('ZREM', PARKED, g)
    redis.call('ZADD', READY, string.format('%d', math.max(vtime(), tag_of(tag) or 0)), g)
  end
end

local freed = {}  -- groups that lost a holder in this call: they may leave ``parked``
local dead = redis.call('ZRANGEBYSCORE', H, '-inf', now)
if #dead > 0 then
  for _, name in ipairs(dead) do
    local rec = redis.call('HGET', HI, name)
    if rec then freed[group_of(select(5, parse(rec)))] = true end
  end
  remove_all('ZREM', H, dead)
  remove_all('HDEL', HI, dead)
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', WL, '-inf', now)) do
  remove_waiter(name)
end

-- A holder without a record that parses is dead (else it pins a slot for good), a
-- lease longer than its record says is cut back, a record without a lease is dropped:
-- the limit counts real holders only. O(holders), and holders are few; still, every call
-- of every caller runs this, so the records come in one HMGET (per 1000: unpack()).
do
  local names = redis.call('ZRANGE', H, 0, -1)
  local recs = {}  -- HMGET's replies, a list per 1000 names
  local bad = {}
  local shortest  -- the shortest lease of a record that parses
  for i = 1, #names, 1000 do
    local part = redis.call('HMGET', HI, unpack(names, i, math.min(i + 999, #names)))
    table.insert(recs, part)
    for j = 1, #part do
      local owner, _, _, lease_ms, info = parse(part[j])
      if not owner then
        table.insert(bad, names[i + j - 1])
      else
        holder_infos[#holder_infos + 1] = info  -- counted by group when asked
        if not shortest or lease_ms < shortest then shortest = lease_ms end
      end
    end
  end
  -- Only an expiry past now + the shortest lease can be too long: read those scores
  -- alone (Redis prints every score it replies with, which cost more than all the rest).
  -- Their records are the ones read above: reading the hash again would move on its
  -- rehashing, and with it the order HKEYS lists orphans in (the note quotes the first).
  local long = shortest and redis.call('ZRANGEBYSCORE', H, string.format('(%d', now + shortest),
                                       '+inf', 'WITHSCORES') or {}
  if #long > 0 then
    local rec_of = {}
    for k, part in ipairs(recs) do
      for j = 1, #part do rec_of[names[(k - 1) * 1000 + j]] = part[j] end
    end
    for i = 1, #long, 2 do
      local name, expiry = long[i], tonumber(long[i + 1])
      local owner, _, _, lease_ms = parse(rec_of[name])
      if owner and expiry > now + lease_ms then
        redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
      end
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

for g in pairs(freed) do unpark(g) end

-- What every reader is told besides its answer: an invalid cluster limit found (or
-- false) and the last repair, "<ms> <what>" (or false).
local function notes()
  local _, bad_limit = cluster_limit()
  return bad_limit, redis.call('HGET', META, 'repaired')
end
"""
)

# The queue's helpers, for the scripts that serve or read the queue. COUNTS and RENEW run
# without them: each function definition makes a closure at every call, and these were
# some 7% of a COUNTS.
_QUEUE = """
-- A group at its cap waits in ``parked`` with its tag, off the front of ``ready``.
local function park(g, tag)
  redis.call('ZREM', READY, g)
  redis.call('ZADD', PARKED, string.format('%d', tag), g)
end

-- A group that has a waiter takes part in the sharing: at the virtual time, or at the
-- tag it left with while that is still ahead. A parked one is checked against its cap
-- again (its holders may have gone without a release: reaped, or lost to a foreign
-- write), so no group stays parked under its cap.
local function join(g)
  if redis.call('ZSCORE', READY, g) then return end
  if redis.call('ZSCORE', PARKED, g) then return unpark(g) end
  local owed = tag_of(redis.call('ZSCORE', IDLE, g)) or 0
  redis.call('ZREM', IDLE, g)
  redis.call('ZADD', READY, string.format('%d', math.max(vtime(), owed)), g)
end

-- Puts the waiter ``name`` (record ``rec``) in its group's queue and its group in the
-- sharing: idempotent, so a waiter's refresh also repairs what another writer removed.
-- Returns 1 when its entry was missing.
local function enlist(name, rec)
  local g = group_of(select(5, parse(rec)))
  local added = redis.call('ZADD', GQ, 0, entry(g, redis.call('ZSCORE', W, name), name))
  join(g)
  return added
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

-- The head waiter of group g: name, owner, lease_ms, info; nil when it has none. Entries
-- of waiters gone, moved or of another group are dropped on the way.
local function head_of(g)
  while true do
    local e = redis.call('ZRANGEBYLEX', GQ, '[' .. g .. ' ', '(' .. g .. '!', 'LIMIT', 0, 1)[1]
    if not e then return nil end
    local order, name = string.match(e, '^%S+ (%d+) (%S+)$')
    if name then
      local rec, score = redis.call('HGET', WI, name), redis.call('ZSCORE', W, name)
      local owner, _, _, lease_ms, info = parse(rec)
      if owner and not score and group_of(info) == g and redis.call('ZSCORE', WL, name) then
        -- a live waiter another writer took out of the queue: its entry keeps its place
        score = string.format('%.0f', tonumber(order) - ORDER_OFFSET)
        redis.call('ZADD', W, score, name)
        repaired('queued waiter ' .. quote(name) .. ' again: it was missing from the queue')
      end
      if owner and score and entry(group_of(info), score, name) == e then
        return name, owner, lease_ms, info
      end
    end
    redis.call('ZREM', GQ, e)
  end
end

-- Tell the new holder: on its listener's own channel when its owner names one
-- ("<listener>.<hex>", keys.grant_channel), so only that process wakes; an owner of an
-- earlier release on the shared channel. Sharded (SPUBLISH) where the server has it,
-- Redis 7 on: a Cluster then delivers it on the slot's own shard, where PUBLISH goes to
-- every node. The listeners subscribe the same way (grants.py).
local function publish_grant(name, owner, token)
  local listener = string.match(owner, '^(%x+)%.%x+$')
  local channel = listener and (CHAN .. ':' .. listener) or CHAN
  local message = string.format('%s %s %d', name, owner, token)
  local sent = redis.pcall('SPUBLISH', channel, message)
  if type(sent) == 'table' and sent.err then  -- before Redis 7: no sharded channels
    redis.call('PUBLISH', channel, message)
  end
end

-- Waiters missing from their groups' queues (queued by an earlier release, or lost to
-- another writer) are put back when the counts show some are missing: O(waiters), only
-- then. A place in the queue without a record is nobody's: removed.
local function heal()
  if redis.call('ZCARD', W) <= redis.call('ZCARD', GQ) then return end
  local back = 0
  for _, name in ipairs(redis.call('ZRANGE', W, 0, -1)) do
    local rec = waiter(name)
    if rec then back = back + enlist(name, rec) else remove_waiter(name) end
  end
  if back > 0 then
    repaired(string.format("put %d waiter(s) back in their groups' queues", back))
  end
end

-- Grant free slots by fair share (see the header) and tell each new holder at once.
local function promote(max)
  if now < grace_until() then return end
  local count = redis.call('ZCARD', H)
  if count >= max then return end
  heal()
  redis.call('ZREMRANGEBYSCORE', IDLE, '-inf', string.format('%d', vtime()))
  while count < max do
    local front = redis.call('ZRANGE', READY, 0, 0, 'WITHSCORES')
    local g = front[1]
    if not g then break end
    local tag = tag_of(front[2]) or vtime()
    local name, owner, lease_ms, info
    local cap, weight = 0, 1
    if #g > GROUP_MAX or not string.match(g, GROUP_PATTERN) then
      redis.call('ZREM', READY, g)  -- its "queue" would be a lex range of some other's
      repaired('dropped ' .. quote(g) .. ' from the groups waiting: not a group name')
    else
      cap, weight = share(g)
      if full(g, cap) then
        park(g, tag)
      else
        name, owner, lease_ms, info = head_of(g)
        if not name then redis.call('ZREM', READY, g) end  -- only stale entries were left
      end
    end
    if name then
      remove_waiter(name, true)
      if redis.call('ZSCORE', H, name) then
        repaired('removed waiter ' .. quote(name) .. ': the name is held')
      else
        local token = redis.call('HINCRBY', META, 'token', 1)
        redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
        redis.call('HSET', HI, name, record(owner, token, now, lease_ms, info))
        publish_grant(name, owner, token)
        count = count + 1
        count_holder(g, 1)
        vtime_now = tag
        redis.call('HSET', META, 'vtime', string.format('%d', tag))
        local next_tag = tag + math.floor(SCALE / weight)
        if not has_waiters(g) then
          leave(g, next_tag)
        elseif full(g, cap) then
          park(g, next_tag)
        else
          redis.call('ZADD', READY, string.format('%d', next_tag), g)
        end
      end
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
"""

ACQUIRE = (
    _PRELUDE
    + _QUEUE
    + """
-- ARGV: 2 name, 3 owner, 4 priority, 5 max, 6 lease_ms, 7 info json (its "group" says
-- which group it waits in), 8 try_only (0|1)
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
  enlist(name, queued)
else
  enqueue()
  redis.call('ZADD', WL, string.format('%d', now + lease_ms), name)
  local rec = record(owner, 0, now, lease_ms, info)
  redis.call('HSET', WI, name, rec)
  enlist(name, rec)
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
    + _QUEUE
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
  local g = group_of(select(5, parse(held)))
  count_holder(g, -1)
  unpark(g)
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
if now < grace_until() and redis.call('ZCARD', H) < max and not at_cap(group_of(info)) then
  remove_waiter(name)
  redis.call('ZADD', H, string.format('%d', now + lease_ms), name)
  redis.call('HSET', HI, name, record(owner, token, acquired_at, lease_ms, info))
  count_holder(group_of(info), 1)
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
    + _QUEUE
    + """
-- ARGV: 2 max
-- Free every held slot (an operator's last resort), then serve the queue.
-- Returns {CLEARED, number of slots freed}
local n = redis.call('ZCARD', H)
redis.call('DEL', H, HI)
held_by = {}
for _, g in ipairs(redis.call('ZRANGE', PARKED, 0, -1)) do unpark(g) end
promote(limit(tonumber(ARGV[2])))
return {R.CLEARED, n}
"""
)

END_GRACE = (
    _PRELUDE
    + _QUEUE
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
    + _QUEUE
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
    + _QUEUE
    + """
-- ARGV: 2 how many waiters to list, in queue order (0: all)
-- Returns {SNAPSHOT, now, grace_until, {name, lease_expiry, record, ...},
--          {name, lease_expiry, record, ...}, cluster limit or -1,
--          invalid cluster limit found or nil, last repair or nil,
--          waiters in all, {group, waiters, ...}}, waiters in queue order.
-- Costs O(holders + waiters listed + groups waiting * log waiters): a status with 10 000
-- waiting lists the first few and counts the rest by group, without reading them.
local rows = tonumber(ARGV[2]) or 0
local holders = {}
for _, name in ipairs(redis.call('ZRANGE', H, 0, -1)) do
  table.insert(holders, name)
  table.insert(holders, redis.call('ZSCORE', H, name))
  table.insert(holders, redis.call('HGET', HI, name))
end
local waiters = {}
for _, name in ipairs(redis.call('ZRANGE', W, 0, rows - 1)) do
  local rec = waiter(name)
  if not rec then
    remove_waiter(name)  -- a place in the queue without a record: nobody waits there
  else
    table.insert(waiters, name)
    table.insert(waiters, redis.call('ZSCORE', WL, name) or '0')
    table.insert(waiters, rec)
  end
end
local by_group = {}
for _, key in ipairs({READY, PARKED}) do
  for _, g in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    table.insert(by_group, g)
    table.insert(by_group, redis.call('ZLEXCOUNT', GQ, '[' .. g .. ' ', '(' .. g .. '!'))
  end
end
local bad_limit, repair = notes()
return {R.SNAPSHOT, now, grace_until(), holders, waiters, limit(-1), bad_limit, repair,
        redis.call('ZCARD', W), by_group}
"""
)

COUNTS = (
    _PRELUDE
    + """
-- ARGV: only the grace
-- The cheap read behind health checks and scalar getters: O(holders), whatever the queue.
-- Returns {COUNTS, now, grace_until, holders, waiters, cluster limit or -1,
--          invalid cluster limit found or nil, last repair or nil, the server's run_id}
local bad_limit, repair = notes()
return {R.COUNTS, now, grace_until(), redis.call('ZCARD', H), redis.call('ZCARD', W), limit(-1),
        bad_limit, repair, run_id or false}
"""
)

SET_SHARE = (
    _PRELUDE
    + _QUEUE
    + """
-- ARGV: 2 group, 3 cap (0: none, else LIMIT_MIN..LIMIT_MAX; '': keep), 4 weight
--       (1..WEIGHT_MAX; '': keep), 5 max
-- Change a group's share for every caller of the namespace, in one step (two admins
-- changing its cap and its weight at once both apply); it applies to the next grant, and
-- a lowered cap evicts nobody. Returns {SHARE_SET, old cap, old weight, new cap, new weight}
local g = ARGV[2]
local old_cap, old_weight = share(g)
local cap, weight = tonumber(ARGV[3]) or old_cap, tonumber(ARGV[4]) or old_weight
if cap == 0 and weight == 1 then
  redis.call('HDEL', SHARES, g)
else
  redis.call('HSET', SHARES, g, string.format('%d %d', cap, weight))
end
unpark(g)
promote(limit(tonumber(ARGV[5])))
return {R.SHARE_SET, old_cap, old_weight, cap, weight}
"""
)
