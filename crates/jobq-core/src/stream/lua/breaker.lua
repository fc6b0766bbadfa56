-- A circuit breaker shared by every worker, one hash per name (a job type).
-- KEYS: 1 breaker hash (failures, opened_at ms, probe job id, probe_at ms)
-- ARGV: 1 op: 'admit' | 'ok' | 'fail' | 'held', 2 threshold, 3 open_for ms, 4 job id
-- admit: 0 = run (a closed circuit, or the half-open probe); else ms to hold the job back.
-- ok: closes the circuit; returns 1 when it was open. fail: counts a consecutive failure;
-- returns 1 when the circuit opens (threshold reached, or the probe failed). held: a probe that
-- did not run gives its turn back.
local now = now_ms()
local open_for = tonumber(ARGV[3])
local op = ARGV[1]
if op == 'admit' then
  local h = redis.call('HMGET', KEYS[1], 'opened_at', 'probe', 'probe_at')
  if not h[1] then return 0 end
  local elapsed = now - tonumber(h[1])
  if elapsed < open_for then return open_for - elapsed end
  -- The probe itself admitted again (its first answer was lost on the way): it runs, and
  -- holds the others back for open_for from now.
  if h[2] == ARGV[4] then
    redis.call('HSET', KEYS[1], 'probe_at', now)
    return 0
  end
  if h[2] and now - tonumber(h[3]) < open_for then return math.min(open_for, 1000) end
  redis.call('HSET', KEYS[1], 'probe', ARGV[4], 'probe_at', now)
  return 0
elseif op == 'ok' then
  local was_open = redis.call('HEXISTS', KEYS[1], 'opened_at')
  redis.call('DEL', KEYS[1])
  return was_open
elseif op == 'fail' then
  local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  local h = redis.call('HMGET', KEYS[1], 'opened_at', 'probe')
  redis.call('PEXPIRE', KEYS[1], open_for * 10 + 3600000)
  if h[2] or (not h[1] and failures >= tonumber(ARGV[2])) then
    redis.call('HSET', KEYS[1], 'opened_at', now)
    redis.call('HDEL', KEYS[1], 'probe', 'probe_at')
    return 1
  end
  return 0
elseif op == 'held' then
  if redis.call('HGET', KEYS[1], 'probe') == ARGV[4] then
    redis.call('HDEL', KEYS[1], 'probe', 'probe_at')
  end
  return 0
end
return redis.error_reply('unknown breaker op ' .. op)
