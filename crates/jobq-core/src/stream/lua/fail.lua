-- End a running attempt that did not succeed: check the lease token, ack and delete the stream
-- entry, write the outbox event, then either schedule a retry (attempts left and the error is
-- retryable and no cancel was requested), cancel the job (reason 'cancelled': a cancel request
-- stopped it, or was made while a retryable attempt ran), or dead-letter
-- it (the event then carries the envelope for the dead_jobs row). Reason 'postponed': the
-- attempt never ran (a limit or an open circuit held it back): the job goes back to the
-- scheduled set for the delay without spending an attempt and without a history row.
-- KEYS: 1 job hash, 2 priority stream, 3 events stream, 4 scheduled zset
-- ARGV: 1 id, 2 lease token, 3 entry id, 4 group, 5 error message,
--       6 retry delay ms ('-1' = not retryable), 7 dead retention seconds, 8 reason when fatal
-- Returns {1, 'retrying'|'dead'|'cancelled'|'postponed'}, or {0, state} when the lease is stale,
-- or {2, what} when this lease's outcome was written already (an earlier call whose reply was
-- lost, sent again by the worker) and the job is still where that call left it: nothing
-- changes. The hash's `ended_lease` names the attempt whose outcome this script last wrote.
local cur = redis.call('HMGET', KEYS[1], 'state', 'lease', 'cancel_requested', 'ended_lease')
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] then
  if cur[4] == ARGV[2] then
    local was = ({retrying = 'retrying', scheduled = 'postponed', dead = 'dead', cancelled = 'cancelled'})[cur[1]]
    if was then return {2, was} end
  end
  return {0, cur[1] or ''}
end
redis.call('HSET', KEYS[1], 'ended_lease', ARGV[2])
-- A cancel requested while the attempt ran stops the job here too: it is not retried or
-- postponed (the worker may not have seen the request before the attempt ended).
local cancel_requested = cur[3] == '1'

local now = now_ms()
redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
if ARGV[8] == 'cancelled' then
  attempt_event(KEYS[3], KEYS[1], ARGV[1], 'cancelled', now, {'error', ARGV[5]})
  finish(KEYS[1], ARGV[1], 'cancelled', now, ARGV[7], ARGV[5])
  return {1, 'cancelled'}
end
if ARGV[8] == 'postponed' and cancel_requested then
  -- The attempt never ran: no history row, and it does not count.
  redis.call('HINCRBY', KEYS[1], 'attempt', -1)
  redis.call('HINCRBY', KEYS[1], 'attempts_total', -1)
  finish(KEYS[1], ARGV[1], 'cancelled', now, ARGV[7], 'cancelled before it ran (' .. ARGV[5] .. ')')
  return {1, 'cancelled'}
end
if ARGV[8] == 'postponed' then
  local run_at = now + math.max(tonumber(ARGV[6]), 0)
  redis.call('HINCRBY', KEYS[1], 'attempt', -1)
  redis.call('HINCRBY', KEYS[1], 'attempts_total', -1)
  redis.call('HINCRBY', KEYS[1], 'postponed', 1)
  redis.call('ZADD', KEYS[4], run_at, ARGV[1])
  redis.call('HSET', KEYS[1], 'state', 'scheduled', 'run_at', run_at, 'held_by', ARGV[5])
  redis.call('HDEL', KEYS[1], 'lease', 'entry')
  track_expiry(KEYS[1], ARGV[1])
  return {1, 'postponed'}
end
local h = redis.call('HMGET', KEYS[1], 'attempt', 'max_attempts')
local delay = tonumber(ARGV[6])
if delay >= 0 and tonumber(h[1]) < tonumber(h[2]) and cancel_requested then
  -- The attempt failed on its own: its history row says so; the job ends cancelled.
  attempt_event(KEYS[3], KEYS[1], ARGV[1], 'failed', now, {'error', ARGV[5]})
  finish(KEYS[1], ARGV[1], 'cancelled', now, ARGV[7], ARGV[5])
  return {1, 'cancelled'}
end
if delay >= 0 and tonumber(h[1]) < tonumber(h[2]) then
  local retry_at = now + delay
  attempt_event(KEYS[3], KEYS[1], ARGV[1], 'failed', now, {'error', ARGV[5], 'retry_at', retry_at})
  redis.call('ZADD', KEYS[4], retry_at, ARGV[1])
  redis.call('HSET', KEYS[1], 'state', 'retrying', 'finished_at', now, 'last_error', ARGV[5], 'run_at', retry_at)
  redis.call('HDEL', KEYS[1], 'lease', 'entry')
  -- Its deadline may have passed while it ran (the promoter then let go of its member): the
  -- next sweep dead-letters it rather than its retry.
  track_expiry(KEYS[1], ARGV[1])
  return {1, 'retrying'}
end
local reason = ARGV[8]
if delay >= 0 then
  reason = 'max_attempts'
end
dead_letter(KEYS[1], KEYS[3], ARGV[1], reason, ARGV[5], now, ARGV[7])
return {1, 'dead'}
