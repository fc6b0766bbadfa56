-- Re-enqueue a dead job for a new run with a fresh attempt count. Only a job still dead in the
-- run the DLQ row recorded is re-enqueued, so retrying twice enqueues once. A hash that expired
-- is rebuilt from the envelope kept in Postgres.
-- KEYS: 1 job hash, 2 priority stream
-- ARGV: 1 id, 2 envelope json, 3 priority, 4 type, 5 max_attempts, 6 run that died, 7 group
-- Returns {1, 'queued', new run}, or {0, current state, current run}.
local h = redis.call('HMGET', KEYS[1], 'state', 'run')
if h[1] and (h[1] ~= 'dead' or tonumber(h[2]) ~= tonumber(ARGV[6])) then
  return {0, h[1], tonumber(h[2] or '0')}
end
local now = now_ms()
local run = tonumber(ARGV[6]) + 1
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[7], '0', 'MKSTREAM')
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
redis.call('HDEL', KEYS[1], 'last_error', 'result', 'started_at', 'finished_at', 'lease', 'dead_reason', 'worker',
  'expires_at', 'cancel_requested', 'unique_key', 'unique_hold', 'progress', 'checkpoint', 'held_by', 'postponed')
redis.call('HSET', KEYS[1], 'envelope', ARGV[2], 'state', 'queued', 'prio', ARGV[3], 'type', ARGV[4],
  'max_attempts', ARGV[5], 'attempt', 0, 'reclaims', 0, 'run', run, 'run_at', now, 'enqueued_at', now, 'entry', entry)
if not h[1] then
  -- A rebuilt hash has lost its lease counter: lease tokens go on from the Redis clock, past
  -- any token of the job's earlier life, so that a worker still holding one (frozen since)
  -- cannot complete the new attempt.
  redis.call('HSET', KEYS[1], 'lease_seq', string.format('%d', now))
end
redis.call('PERSIST', KEYS[1])
return {1, 'queued', run}
