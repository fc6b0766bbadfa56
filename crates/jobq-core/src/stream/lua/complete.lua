-- Complete a running attempt: check the lease token, ack and delete the stream entry, mark the
-- job succeeded, write the outbox event, release its unique lock and set the hash to expire.
-- KEYS: 1 job hash, 2 priority stream, 3 events stream
-- ARGV: 1 id, 2 lease token, 3 entry id, 4 group, 5 result json or '', 6 retention seconds
-- Returns 1, or 0 when the lease is stale (another owner has the job now).
local cur = redis.call('HMGET', KEYS[1], 'state', 'lease')
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] then
  return 0
end
local now = now_ms()
redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
attempt_event(KEYS[3], KEYS[1], ARGV[1], 'succeeded', now, {})
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'result', ARGV[5])
end
finish(KEYS[1], ARGV[1], 'succeeded', now, ARGV[6], nil)
return 1
