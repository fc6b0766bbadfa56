-- Enqueue one job: create its hash, then put it in its priority stream (ready now) or in the
-- scheduled set (later). Refuses an id that exists and returns its state instead.
-- KEYS: 1 job hash, 2 priority stream, 3 scheduled zset
-- ARGV: 1 id, 2 envelope json, 3 priority, 4 type, 5 max_attempts, 6 delay ms or '',
--       7 run_at ms or '', 8 consumer group
-- Returns {created 0|1, state, run_at ms}
local existing = redis.call('HGET', KEYS[1], 'state')
if existing then
  return {0, existing, tonumber(redis.call('HGET', KEYS[1], 'run_at') or '0')}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run_at = now
if ARGV[6] ~= '' then
  run_at = now + tonumber(ARGV[6])
elseif ARGV[7] ~= '' then
  run_at = tonumber(ARGV[7])
end
if run_at > now then
  redis.call('ZADD', KEYS[3], run_at, ARGV[1])
  redis.call('HSET', KEYS[1], 'envelope', ARGV[2], 'state', 'scheduled', 'prio', ARGV[3], 'type', ARGV[4],
    'max_attempts', ARGV[5], 'attempt', 0, 'run', 1, 'run_at', run_at, 'enqueued_at', now)
  return {1, 'scheduled', run_at}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[8], '0', 'MKSTREAM')
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'envelope', ARGV[2], 'state', 'queued', 'prio', ARGV[3], 'type', ARGV[4],
  'max_attempts', ARGV[5], 'attempt', 0, 'run', 1, 'run_at', run_at, 'enqueued_at', now, 'entry', entry)
return {1, 'queued', run_at}
