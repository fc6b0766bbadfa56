-- Fail a running attempt: check the lease token, ack and delete the stream entry, write the
-- outbox event, and either schedule a retry (attempts left and the error is retryable) or
-- dead-letter the job (the event then carries the envelope for the dead_jobs row).
-- KEYS: 1 job hash, 2 priority stream, 3 events stream, 4 scheduled zset
-- ARGV: 1 id, 2 lease token, 3 entry id, 4 group, 5 error message,
--       6 retry delay ms ('-1' = not retryable), 7 dead retention seconds, 8 reason when fatal
-- Returns {1, 'retrying'|'dead'}, or {0, state} when the lease is stale.
local cur = redis.call('HMGET', KEYS[1], 'state', 'lease')
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] then
  return {0, cur[1] or ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'run', 'attempt', 'type', 'started_at', 'worker', 'max_attempts')
local delay = tonumber(ARGV[6])
if delay >= 0 and tonumber(h[2]) < tonumber(h[6]) then
  local retry_at = now + delay
  redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'run', h[1], 'attempt', h[2], 'outcome', 'failed',
    'type', h[3], 'started_at', h[4], 'finished_at', now, 'worker', h[5], 'error', ARGV[5], 'retry_at', retry_at)
  redis.call('ZADD', KEYS[4], retry_at, ARGV[1])
  redis.call('HSET', KEYS[1], 'state', 'retrying', 'finished_at', now, 'last_error', ARGV[5], 'run_at', retry_at)
  redis.call('HDEL', KEYS[1], 'lease', 'entry')
  return {1, 'retrying'}
end
local reason = ARGV[8]
if delay >= 0 then
  reason = 'max_attempts'
end
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'run', h[1], 'attempt', h[2], 'outcome', 'dead',
  'type', h[3], 'started_at', h[4], 'finished_at', now, 'worker', h[5], 'error', ARGV[5],
  'reason', reason, 'envelope', redis.call('HGET', KEYS[1], 'envelope'))
redis.call('HSET', KEYS[1], 'state', 'dead', 'finished_at', now, 'last_error', ARGV[5], 'dead_reason', reason)
redis.call('HDEL', KEYS[1], 'lease', 'entry')
if tonumber(ARGV[7]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[7])
end
return {1, 'dead'}
