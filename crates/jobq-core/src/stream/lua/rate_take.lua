-- A rate limit shared by every worker (GCRA): one start per INTERVAL ms on average, up to
-- BURST at once. A start over the rate reserves the next free time instead of being refused,
-- so held-back jobs come back one per interval, in order, and are let in at their time.
-- KEYS: 1 theoretical arrival time (ms), 2 reservations zset (member -> time ms)
-- ARGV: 1 interval ms (may be fractional), 2 burst, 3 member (job id)
-- Returns 0 when the start is allowed now, else the milliseconds until its reserved time.
local now = now_ms()
local reserved = redis.call('ZSCORE', KEYS[2], ARGV[3])
if reserved then
  reserved = tonumber(reserved)
  if reserved <= now + 5 then
    redis.call('ZREM', KEYS[2], ARGV[3])
    return 0
  end
  return math.ceil(reserved - now)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 600000)
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - interval * (tonumber(ARGV[2]) - 1)
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.ceil(next_tat - now) + 1000)
if now >= allow_at then
  return 0
end
redis.call('ZADD', KEYS[2], string.format('%.3f', allow_at), ARGV[3])
redis.call('PEXPIRE', KEYS[2], math.ceil(allow_at - now) + 600000)
return math.ceil(allow_at - now)
