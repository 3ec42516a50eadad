"""The Lua scripts of the L2 tier: every check-then-act on Redis, one script each.

Each script touches the keys of one entry only (its value and its lock share a Redis Cluster
hash tag), or of one cache's tag index (which share the cache's tag), so the same scripts run on
one server and on a cluster. Each has a header naming its ``KEYS`` and ``ARGV``. They are
registered once per client by :class:`oqron_cache.tiers.redis.RedisConn`.
"""

from __future__ import annotations

# KEYS[1] - the entry's value key
# KEYS[2] - the entry's lock key
# ARGV[1] - the version the writer saw when it started ('' = no entry)
# ARGV[2] - the new envelope
# ARGV[3] - physical TTL of the envelope, ms
# ARGV[4] - the writer's lock token ('' = it holds no lock)
# ARGV[5] - bus channel
# ARGV[6] - bus message announcing the fill
# ARGV[7] - how long ago the load read the entry, ms (its age)
# ARGV[8] - how long a delete's tombstone lives, ms (the horizon)
# Writes only if the entry's version is still ARGV[1] (a newer write or an invalidation wins),
# announces it, and releases the lock if the writer still owns it. A load that found no entry
# and is older than the horizon is refused too: a delete made while it ran may have left a
# tombstone that has expired since, so "still no entry" proves nothing.
# Returns {1 written | 0 refused (version) | 2 refused (too old), Redis time in µs}.
FILL = """
local cur = redis.call('GET', KEYS[1])
local seen = ''
if cur then seen = string.sub(cur, 3, 10) end
local written = 0
if seen == ARGV[1] then
  if seen == '' and tonumber(ARGV[7]) > tonumber(ARGV[8]) then
    written = 2
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    redis.call('PUBLISH', ARGV[5], ARGV[6])
    written = 1
  end
end
if ARGV[4] ~= '' then
  local held = redis.call('GET', KEYS[2])
  if held and string.sub(held, 2) == ARGV[4] then
    redis.call('DEL', KEYS[2])
  end
end
local t = redis.call('TIME')
return {written, tonumber(t[1]) * 1000000 + tonumber(t[2])}
"""

# KEYS[1] - the entry's value key
# ARGV[1] - the new envelope (a value, or a tombstone for a delete)
# ARGV[2] - physical TTL, ms
# ARGV[3] - bus channel
# ARGV[4] - bus message
# An unconditional write (a set) and its announcement, in one round trip.
PUT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS[1] - the entry's value key
# Redis Cluster only (a single server pipelines TIME and GET): the clock of the entry's node and
# the envelope, in one round trip. Returns {seconds, µs, the envelope or false}.
READ_AT = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('GET', KEYS[1])}
"""

# A lock's value is its phase (one character) followed by its holder's token:
#   r  someone is computing the value (a cold load, a refresh running in a process or worker)
#   q  a refresh task was sent and no worker has started it yet
#   f  the last refresh failed: the lock only throttles further refreshes until it expires
# Only "r" is worth waiting for: a cold load takes over a "q" or "f" lock (the queued task then
# finds its lock taken and stands down), so no read waits out a lock that nothing computes.
# Scripts that check the holder compare the token, whatever the phase.

# KEYS[1] - the entry's value key
# KEYS[2] - the entry's lock key
# ARGV[1] - the caller's lock token
# ARGV[2] - lock TTL, ms
# ARGV[3] - the phase the caller takes it in ('r' or 'q')
# ARGV[4] - '1': take over a lock in phase 'q' or 'f' (a cold load), else '0'
# ARGV[5] - the instant (Redis's clock, µs) the caller stops waiting for the reply; '0': none
# Try to take the lock and, in the same round trip, read the entry: a waiter learns whether a
# holder filled it already, a winner double-checks before running the resolver. A request that
# runs after its caller gave up (a paused server runs what it had queued when it wakes) takes
# no lock: nobody would compute under it, and every reader of the key would wait it out.
# Returns {1 if the lock was taken else 0, the envelope or nil, Redis time in µs, the lock's
# remaining ms (when not taken: when it is worth asking again), the holder's phase ('' if
# taken, '-' if the request came too late to take anything)}.
ACQUIRE_OR_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mine = ARGV[3] .. ARGV[1]
local deadline = tonumber(ARGV[5] or '0')
local won = false
if deadline == 0 or now <= deadline then
  won = redis.call('SET', KEYS[2], mine, 'NX', 'PX', ARGV[2])
end
local phase = ''
if deadline > 0 and now > deadline then
  phase = '-'  -- too late: nothing taken (a caller that still reads this asks again)
elseif not won then
  local held = redis.call('GET', KEYS[2])
  if held then phase = string.sub(held, 1, 1) end
  if ARGV[4] == '1' and (phase == 'q' or phase == 'f') then
    redis.call('SET', KEYS[2], mine, 'PX', ARGV[2])
    won = true
    phase = ''
  end
end
local cur = redis.call('GET', KEYS[1])
if won then
  return {1, cur, now, tonumber(ARGV[2]), ''}
end
return {0, cur, now, redis.call('PTTL', KEYS[2]), phase}
"""

# KEYS[1] - the entry's value key
# KEYS[2] - the entry's lock key
# ARGV[1] - the token of the refresh task's lock
# ARGV[2] - lock TTL, ms
# A worker starts a refresh: claim the lock it was sent under (phase 'q' becomes 'r', for a new
# lock_ttl) and read the clock and the entry, in one round trip. Returns {seconds, µs, the
# envelope or false, 1 claimed | 0 no lock any more | -1 someone else holds it}.
CLAIM_READ = """
local claim = 0
local held = redis.call('GET', KEYS[2])
if held then
  if held == ARGV[1] or string.sub(held, 2) == ARGV[1] then
    redis.call('SET', KEYS[2], 'r' .. ARGV[1], 'PX', ARGV[2])
    claim = 1
  else
    claim = -1
  end
end
local t = redis.call('TIME')
return {t[1], t[2], redis.call('GET', KEYS[1]), claim}
"""

# KEYS[1] - the entry's value key
# KEYS[2] - the entry's lock key
# ARGV[1] - the tombstone envelope (a new version, no value)
# ARGV[2] - physical TTL of the tombstone, ms
# ARGV[3] - bus channel
# ARGV[4] - bus message
# A delete: drop the value first (DEL is allowed even when Redis is out of memory), and the lock
# (a load that began before the delete cannot fill any more: nobody should wait for it),
# announce it, then leave the tombstone that makes in-flight older fills fail their
# compare-and-set. If the tombstone cannot be written (OOM), the delete has still happened.
TOMBSTONE = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
redis.pcall('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] - the lock key
# ARGV[1] - the token of the holder
# Compare-and-delete: a holder can only release its own lock (in whatever phase).
RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and (held == ARGV[1] or string.sub(held, 2) == ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] - the lock key
# ARGV[1] - the token of the holder
# ARGV[2] - new TTL, ms
# ARGV[3] - the new phase ('' = keep it)
# Compare-and-extend: keeps a failed refresh's lock as a throttle ('f'), or marks a refresh that
# runs in this process after all ('r').
EXTEND = """
local held = redis.call('GET', KEYS[1])
if held and (held == ARGV[1] or string.sub(held, 2) == ARGV[1]) then
  if ARGV[3] ~= '' then
    return redis.call('SET', KEYS[1], ARGV[3] .. ARGV[1], 'PX', ARGV[2]) and 1 or 0
  end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


# KEYS[1] - the entry's value key
# ARGV[1] - the version the toucher read
# ARGV[2] - 16 bytes: new fresh_until and stale_until (float64 big-endian)
# ARGV[3] - new physical TTL, ms
# Sliding strategy: move an entry's freshness forward, only if it was not replaced meanwhile.
TOUCH = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 3, 10) == ARGV[1] then
  redis.call('SETRANGE', KEYS[1], 18, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


# KEYS[1]    - the cache's invalidation log (sorted set, cache-wide slot)
# KEYS[2..n] - the tag indexes of the entry's tags (sorted sets, same slot)
# ARGV[1]    - the member naming the entry: its encoded key
# ARGV[2]    - how long the tag indexes must live at least, ms
# ARGV[3]    - when the load of the entry began (Redis time, µs)
# ARGV[4]    - how long an entry lives in Redis (ttl + stale_ttl), µs
# After a fill (or a set, or a slide of a sliding entry): index the entry under its tags, scored
# with Redis's clock now, and return the invalidations recorded since its load began. Atomic: an
# invalidation either comes before (the filler sees it and withdraws its entry) or after (its
# scan of the tag index finds the entry). A key is one member however often it is written; a
# member not indexed again within an entry's lifetime names an entry that is gone, and leaves.
INDEX = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local score = string.format('%.0f', now)
local gone = string.format('%.0f', now - tonumber(ARGV[4]))
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], score, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. gone)
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
end
return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')
"""

# KEYS[1] - a tag index (sorted set)
# ARGV    - pairs: member, the score it had when the invalidation read it
# After a tag invalidation dropped a page of entries: remove their members, except those indexed
# again since the page was read (a fill that landed after the drop keeps its place).
UNINDEX = """
local n = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS[1] - the cache's invalidation log
# ARGV[1] - the invalidation ('p:' .. pattern or 't:' .. tag)
# ARGV[2] - how long invalidations are remembered, ms
# Records an invalidation at Redis's clock (µs) and forgets the old ones; returns the time.
# (Scores are formatted as integers: Lua's own number format would round the µs away.)
RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local old = now - tonumber(ARGV[2]) * 1000
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', old))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return now
"""

# KEYS[1] - the entry's value key
# ARGV[1] - the tag, as the JSON string it is in the envelope's tag block (e.g. "\"t:1\"")
# ARGV[2] - tombstone envelope
# ARGV[3] - tombstone TTL, ms
# Tag invalidation: drop the entry if it carries the tag now (a newer write without the tag
# stays). The tag block is a JSON list of JSON strings, in which every quote inside a string is
# escaped; so '[' or ',' then ARGV[1] then ',' or ']' is exactly an element equal to the tag.
DROP_IF_TAGGED = """
local cur = redis.call('GET', KEYS[1])
if not cur or string.len(cur) < 44 or bit.band(string.byte(cur, 2), 1) == 1 then
  return 0
end
local n = struct.unpack('>H', string.sub(cur, 43, 44))
if n == 0 then
  return 0
end
local block = string.sub(cur, 45, 44 + n)
local e = ARGV[1]
if block == '[' .. e .. ']'
    or string.sub(block, 1, #e + 2) == '[' .. e .. ','
    or string.sub(block, -(#e + 2)) == ',' .. e .. ']'
    or string.find(block, ',' .. e .. ',', 1, true) then
  redis.call('DEL', KEYS[1])
  redis.pcall('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] - the entry's value key
# ARGV[1] - the version to drop (8 bytes)
# ARGV[2] - tombstone envelope
# ARGV[3] - tombstone TTL, ms
# ARGV[4] - bus channel ('' = do not announce; the caller announces in bulk)
# ARGV[5] - bus message
# Drop the entry only if it is still that version (an invalidation must not hit a newer write).
DROP_IF_VERSION = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 3, 10) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[4] ~= '' then
    redis.call('PUBLISH', ARGV[4], ARGV[5])
  end
  redis.pcall('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


# KEYS[1] - the entry's value key
# KEYS[2] - the entry's write-through outcomes (hash: version hex -> status; "hw" -> the newest
#           created_at that reached the origin)
# ARGV[1] - the new envelope
# ARGV[2] - its physical TTL, ms
# ARGV[3] - its created_at (seconds, the writer's wall clock)
# ARGV[4] - bus channel
# ARGV[5] - bus message
# ARGV[6] - the new envelope's version (8 bytes)
# ARGV[7] - the version as hex (the outcome's field)
# ARGV[8] - how long outcomes are kept, ms
# ARGV[9] - when the origin accepted this write (seconds, the worker's wall clock)
# ARGV[10] - a new version (8 bytes) for a newer delete's tombstone, if the link yields to it
# Write-through's cache link: write unless a newer write reached the origin, or a newer write (or
# delete) is already in the cache, or a fill whose load began after the origin accepted this
# write (it read this value or a newer one; a fill's created_at is when its load began). A fill
# that began before it read the origin before this write, and is replaced. A newer delete stays,
# but under a new version: a fill based on the tombstone may have read the origin before
# this write, and must fail its compare-and-set. Record the outcome "ok" either way, announce.
# Idempotent: a redelivered link rewrites the same entry. Returns 1 (written), 0 (yielded), or
# 2 without doing anything when the write's record is not "origin" (or "ok", a redelivery):
# Redis lost what orders it, and the caller drops the key instead.
PUT_IF_NEWER = """
local mine = redis.call('HGET', KEYS[2], ARGV[7])
if mine ~= 'origin' and mine ~= 'ok' then
  return 2
end
local cur = redis.call('GET', KEYS[1])
local write = true
local hw = tonumber(redis.call('HGET', KEYS[2], 'hw') or '-1')
if hw > tonumber(ARGV[3]) then
  write = false
elseif cur and string.len(cur) >= 44 and string.sub(cur, 3, 10) ~= ARGV[6] then
  local created = struct.unpack('>d', string.sub(cur, 11, 18))
  if bit.band(string.byte(cur, 2), 3) ~= 0 then
    write = created <= tonumber(ARGV[3])
  else
    write = created <= tonumber(ARGV[9])
  end
end
if write then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif cur and string.len(cur) >= 44 and bit.band(string.byte(cur, 2), 1) ~= 0 then
  -- Yielding to a newer delete: the delete stays, under a new version, so that a fill based
  -- on the tombstone (its load may have read the origin before this write) fails its
  -- compare-and-set.
  redis.call('SETRANGE', KEYS[1], 2, ARGV[10])
end
redis.call('HSET', KEYS[2], ARGV[7], 'ok')
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('PUBLISH', ARGV[4], ARGV[5])
if write then
  return 1
end
return 0
"""


# KEYS[1] - the entry's value key
# ARGV[1] - the envelope of a set() or of a delete's tombstone, made while Redis was unreachable
# ARGV[2] - its physical TTL, ms
# ARGV[3] - its created_at (seconds, the writer's wall clock)
# ARGV[4] - bus channel
# ARGV[5] - bus message
# The replay of a deferred write (auto-recovery): lands unless a newer write (or delete) is there
# already; like any write it replaces a fill. Returns 1 if written.
WRITE_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
if cur and string.len(cur) >= 44 and bit.band(string.byte(cur, 2), 3) ~= 0 then
  local created = struct.unpack('>d', string.sub(cur, 11, 18))
  if created > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""


# KEYS[1] - the entry's write-through outcomes (hash; field "hw" = newest created_at written)
# KEYS[2] - the entry's origin-write lock
# ARGV[1] - the link's lock token
# ARGV[2] - lock TTL, ms
# ARGV[3] - the write's version hex
# ARGV[4] - the write's created_at
# ARGV[5] - how long outcomes are kept, ms
# Before an origin write: 'done' (already written: a redelivery), 'superseded' (a newer write
# reached the origin first; recorded as ok), 'go' (lock taken: write now) or 'wait'.
ORIGIN_BEGIN = """
local state = redis.call('HGET', KEYS[1], ARGV[3])
if state and (string.sub(state, 1, 6) == 'origin' or string.sub(state, 1, 2) == 'ok') then
  return 'done'
end
local hw = tonumber(redis.call('HGET', KEYS[1], 'hw') or '-1')
if hw > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], ARGV[3], 'ok')
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 'superseded'
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 'go'
end
return 'wait'
"""

# KEYS[1] - the entry's write-through outcomes
# KEYS[2] - the entry's origin-write lock
# ARGV[1] - the link's lock token
# ARGV[2] - the write's version hex
# ARGV[3] - the write's created_at
# ARGV[4] - how long outcomes are kept, ms
# ARGV[5] - when the origin accepted it (seconds, wall clock)
# After an origin write: record it, when (field "t" .. version, for a redelivered cache link),
# and the high-water mark; release the lock. The record is "origin" if the write's record
# ("sent", made by set()) was there all along, else "origin-lost": Redis forgot what ordered
# this write against others (restarted empty, evicted), and its cache link drops the key.
ORIGIN_DONE = """
local prior = redis.call('HGET', KEYS[1], ARGV[2])
local mark = 'origin-lost'
if prior == 'sent' or prior == 'origin' then
  mark = 'origin'
end
redis.call('HSET', KEYS[1], ARGV[2], mark, 't' .. ARGV[2], ARGV[5])
local hw = tonumber(redis.call('HGET', KEYS[1], 'hw') or '-1')
if tonumber(ARGV[3]) > hw then
  redis.call('HSET', KEYS[1], 'hw', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local held = redis.call('GET', KEYS[2])
if held and (held == ARGV[1] or string.sub(held, 2) == ARGV[1]) then
  redis.call('DEL', KEYS[2])
end
return 1
"""
