-- Complete a running attempt: check the lease token, ack and delete the stream entry, mark the
-- job succeeded, write the outbox event, and set the hash to expire per retention.
-- KEYS: 1 job hash, 2 priority stream, 3 events stream
-- ARGV: 1 id, 2 lease token, 3 entry id, 4 group, 5 result json or '', 6 retention seconds
-- Returns 1, or 0 when the lease is stale (another owner has the job now).
local cur = redis.call('HMGET', KEYS[1], 'state', 'lease')
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'run', 'attempt', 'type', 'started_at', 'worker')
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'run', h[1], 'attempt', h[2], 'outcome', 'succeeded',
  'type', h[3], 'started_at', h[4], 'finished_at', now, 'worker', h[5])
redis.call('HSET', KEYS[1], 'state', 'succeeded', 'finished_at', now)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'result', ARGV[5])
end
redis.call('HDEL', KEYS[1], 'lease', 'entry')
if tonumber(ARGV[6]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
return 1
