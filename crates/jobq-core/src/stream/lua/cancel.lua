-- Cancel a job. Queued, scheduled or retrying: it never starts (entry deleted, state
-- cancelled). Running: the cancel flag is set (workers see it at their next heartbeat) and
-- published for a fast path; the worker then ends the attempt as cancelled.
-- KEYS: 1 job hash, 2 scheduled zset
-- ARGV: 1 id, 2 stream key prefix (priority appended), 3 cancel channel, 4 retention seconds
-- Returns {1, 'cancelled'|'running'} or {0, state ('' when there is no such job)}.
local h = redis.call('HMGET', KEYS[1], 'state', 'entry', 'prio')
local s = h[1]
if not s then return {0, ''} end
if s == 'succeeded' or s == 'dead' or s == 'cancelled' then return {0, s} end
if s == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 1)
  redis.call('PUBLISH', ARGV[3], ARGV[1])
  return {1, 'running'}
end
if s == 'queued' and h[2] then
  redis.call('XDEL', ARGV[2] .. h[3], h[2])
end
redis.call('ZREM', KEYS[2], ARGV[1])
finish(KEYS[1], ARGV[1], 'cancelled', now_ms(), ARGV[4], nil)
return {1, 'cancelled'}
