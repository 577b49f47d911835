"""Lua scripts: every read-modify-write of a channel runs atomically in Redis.

Times come from the Redis clock (TIME), so nodes with skewed clocks agree on expiry.
Numbers are formatted with %d: Lua 5.1 would print large ones in exponent notation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


@dataclass(slots=True, frozen=True)
class Script:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# KEYS: meta, history. ARGV: pubsub name, body, history size, history ttl ms,
# meta ttl ms (<= 0: no expiry), epoch to use if the stream is new, and optionally
# the publish command (SPUBLISH on a Redis Cluster with sharded pub/sub; PUBLISH).
# A new stream records when it was made and its meta ttl (see HISTORY).
# Returns {offset, epoch}. Entry: "<expires_at_ms>:<offset>:<body>";
# message: "p<offset>:<epoch>\n<body>" (see wire.py).
_PUBLISH_BODY = """
local meta, history = KEYS[1], KEYS[2]
local size, ttl, meta_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  -- A new stream: whatever is left of an old list belongs to a lost epoch.
  epoch = ARGV[6]
  redis.call('DEL', history)
  redis.call('HSET', meta, 'e', epoch, 'c', string.format('%d', now), 'l', ARGV[5])
end
local offset = redis.call('HINCRBY', meta, 's', 1)
if meta_ttl > 0 then
  redis.call('PEXPIRE', meta, meta_ttl)
else
  redis.call('PERSIST', meta)
end
redis.call('RPUSH', history, string.format('%d:%d:', now + ttl, offset) .. ARGV[2])
redis.call('LTRIM', history, -size, -1)
-- Drop expired entries from the front; ones behind a longer-lived head are
-- filtered on read (TTLs may differ between publishes).
while true do
  local head = redis.call('LINDEX', history, 0)
  if not head or tonumber(string.match(head, '^(%d+):')) > now then break end
  redis.call('LPOP', history)
end
if redis.call('PTTL', history) < ttl then redis.call('PEXPIRE', history, ttl) end
redis.call(ARGV[7] or 'PUBLISH', ARGV[1], string.format('p%d:', offset) .. epoch .. '\\n' .. ARGV[2])
return {offset, epoch}
"""
PUBLISH = Script(_NOW + _PUBLISH_BODY)

# PUBLISH behind a fence (shim.core.broker.Fence). KEYS: meta, history, fence (hash: source
# -> "<a>-<b>-<c>", the position of its last publish here). ARGV: PUBLISH's seven (the
# publish command included), then source, the position's three numbers, fence ttl ms,
# "1" when the channel keeps history ("0": publish only, offset 0).
# Returns {-1, ""} when the channel already has this position of the source or a later
# one (nothing published), else PUBLISH's reply. One script for both kinds of channel,
# so a flushed script cache fails (and is retried) for every fenced item alike.
FENCED_PUBLISH = Script(
    _NOW
    + """
local fence, source = KEYS[3], ARGV[8]
local new = {tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])}
local last = redis.call('HGET', fence, source)
if last then
  local old = {string.match(last, '^(%d+)-(%d+)-(%d+)$')}
  local later = false
  for i = 1, 3 do
    local o = tonumber(old[i])
    if new[i] ~= o then
      later = new[i] > o
      break
    end
  end
  if not later then return {-1, ''} end
end
redis.call('HSET', fence, source, ARGV[9] .. '-' .. ARGV[10] .. '-' .. ARGV[11])
redis.call('PEXPIRE', fence, ARGV[12])
if ARGV[13] ~= '1' then
  redis.call(ARGV[7], ARGV[1], 'p0:\\n' .. ARGV[2])
  return {0, ''}
end
"""
    + _PUBLISH_BODY
)

# Reading creates nothing. A channel without meta reads as offset 0 in the blank epoch
# "b<n>", n = now // window (ARGV[5] ms): two reads close in time agree. The first
# publish stores when it made the stream ("c", Redis ms) and its meta ttl ("l"), and a
# blank position of window n is accepted by that stream when it was made at or after
# n * window and less than its meta ttl later. A stream made in between and expired
# since lived at least its meta ttl, so a stream made after it never takes a position
# from before it (the memory engine's `born`, without a key per read).
# KEYS: meta, history. ARGV: limit (-1 all, 0 none), since offset (-1 none), "1"
# reverse, since epoch, blank window ms.
# Returns {top, epoch, accepted (1/0), entry...}; no entries when not accepted.
# The list holds consecutive offsets ending at top, so `since` maps to an index.
HISTORY = Script(
    _NOW
    + """
local meta, history = KEYS[1], KEYS[2]
local limit, since, reverse = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local since_epoch, window = ARGV[4], tonumber(ARGV[5])
local fields = redis.call('HMGET', meta, 'e', 's', 'c', 'l')
local epoch = fields[1]
if not epoch then
  -- Offset 0 is before any publication, whichever epoch it was told.
  local blank = string.format('b%d', math.floor(now / window))
  return {0, blank, since > 0 and 0 or 1}
end
local top = tonumber(fields[2] or '0')
local accepted = since <= 0 or since_epoch == '' or since_epoch == epoch
if not accepted and fields[3] then
  local n = string.match(since_epoch, '^b(%d+)$')
  if n then
    local made, from = tonumber(fields[3]), tonumber(n) * window
    local meta_ttl = tonumber(fields[4] or '0')
    accepted = made >= from and (meta_ttl <= 0 or made - from < meta_ttl)
  end
end
local result = {top, epoch, accepted and 1 or 0}
if limit == 0 or not accepted then return result end
local len = redis.call('LLEN', history)
local first = top - len + 1
local lo, hi = 0, len - 1
if since >= 0 then
  if reverse then hi = math.min(hi, since - first - 1) else lo = math.max(lo, since - first + 1) end
end
local step = hi - lo + 1
if limit > 0 then step = limit end
local function take(entry)
  if tonumber(string.match(entry, '^(%d+):')) > now then result[#result + 1] = entry end
  return limit > 0 and #result - 3 >= limit
end
if reverse then
  local j = hi
  while j >= lo do
    local i = math.max(lo, j - step + 1)
    local chunk = redis.call('LRANGE', history, i, j)
    for k = #chunk, 1, -1 do
      if take(chunk[k]) then return result end
    end
    j = i - 1
  end
else
  local i = lo
  while i <= hi do
    local j = math.min(hi, i + step - 1)
    local chunk = redis.call('LRANGE', history, i, j)
    for k = 1, #chunk do
      if take(chunk[k]) then return result end
    end
    i = j + 1
  end
end
return result
"""
)

# A new epoch for a stream that has meta, at offset 0, keeping the meta's expiry; its
# history goes, and no blank position is accepted any more (it may predate the reset).
# KEYS: meta, history. ARGV: the new epoch. Nothing is made for a channel without meta.
RESET_STREAM = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'c', 'l')
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 's', 0)
end
return 1
"""
)

# Drop presence entries whose expiry passed. KEYS: presence, expiry, users.
_PRUNE = (
    _NOW
    + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  for i = 1, #gone, 1000 do
    local part = {unpack(gone, i, math.min(i + 999, #gone))}
    redis.call('HDEL', KEYS[1], unpack(part))
    redis.call('HDEL', KEYS[3], unpack(part))
  end
end
"""
)

# ARGV: client id, info body, user, ttl ms. Adding again refreshes the expiry.
PRESENCE_ADD = Script(
    _PRUNE
    + """
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], string.format('%d', now + ttl), ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
for i = 1, 3 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
"""
)

# ARGV: client id.
PRESENCE_REMOVE = Script(
    """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
)

# Returns HGETALL of the live entries: {client id, info body, ...}.
PRESENCE_GET = Script(_PRUNE + "\nreturn redis.call('HGETALL', KEYS[1])\n")

# Returns {clients, distinct users}.
PRESENCE_STATS = Script(
    _PRUNE
    + """
local seen, users = {}, 0
for _, user in ipairs(redis.call('HVALS', KEYS[3])) do
  if not seen[user] then
    seen[user] = true
    users = users + 1
  end
end
return {redis.call('HLEN', KEYS[1]), users}
"""
)
