-- Enqueue one job: create its hash, then put it in its priority stream (ready now) or in the
-- scheduled set (later). An id that exists, or a unique key held by a live job, enqueues
-- nothing and returns that job instead.
-- KEYS: 1 job hash, 2 priority stream, 3 scheduled zset, 4 expiring zset, [5 unique key]
-- ARGV: 1 id, 2 envelope json, 3 priority, 4 type, 5 max_attempts, 6 delay ms or '',
--       7 run_at ms or '', 8 consumer group, 9 expires_at ms or '', 10 unique ttl ms or '',
--       11 job key prefix, 12 dead retention seconds, 13 dependency mode ('' | 'succeeded' |
--       'finished'), 14.. ids of the jobs it depends on (same queue)
-- Returns {created 0|1, state, run_at ms, job id}, or {-1, 'unknown dependency', 0, dep id}.
-- A job with unfinished dependencies waits (state waiting) until they finish; one whose
-- dependency is already dead or cancelled is dead-lettered at once (reason dependency_failed)
-- unless the mode is 'finished'.
local existing = redis.call('HGET', KEYS[1], 'state')
if existing then
  return {0, existing, tonumber(redis.call('HGET', KEYS[1], 'run_at') or '0'), ARGV[1]}
end
if KEYS[5] then
  local holder = redis.call('GET', KEYS[5])
  if holder then
    local hk = ARGV[11] .. holder
    local hstate = redis.call('HGET', hk, 'state')
    if hstate then
      return {0, hstate, tonumber(redis.call('HGET', hk, 'run_at') or '0'), holder}
    end
  end
end
local waits, failed, failed_state = {}, nil, nil
if ARGV[13] ~= '' then
  for i = 14, #ARGV do
    local st = redis.call('HGET', ARGV[11] .. ARGV[i], 'state')
    if not st then
      return {-1, 'unknown dependency', 0, ARGV[i]}
    end
    if st == 'dead' or st == 'cancelled' then
      if ARGV[13] ~= 'finished' and not failed then failed, failed_state = ARGV[i], st end
    elseif st ~= 'succeeded' then
      waits[#waits + 1] = ARGV[i]
    end
  end
end
local now = now_ms()
local run_at = now
if ARGV[6] ~= '' then
  run_at = now + tonumber(ARGV[6])
elseif ARGV[7] ~= '' then
  run_at = tonumber(ARGV[7])
end
local fields = {'envelope', ARGV[2], 'prio', ARGV[3], 'type', ARGV[4], 'max_attempts', ARGV[5],
  'attempt', 0, 'attempts_total', 0, 'reclaims', 0, 'run', 1, 'run_at', run_at, 'enqueued_at', now}
if ARGV[9] ~= '' then
  fields[#fields + 1] = 'expires_at'
  fields[#fields + 1] = ARGV[9]
  redis.call('ZADD', KEYS[4], ARGV[9], ARGV[1])
end
if KEYS[5] then
  if ARGV[10] ~= '' then
    redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[10])
  else
    redis.call('SET', KEYS[5], ARGV[1])
  end
  fields[#fields + 1] = 'unique_key'
  fields[#fields + 1] = KEYS[5]
  fields[#fields + 1] = 'unique_hold'
  fields[#fields + 1] = (ARGV[10] ~= '' and 'ttl') or 'terminal'
end
if ARGV[13] ~= '' then
  fields[#fields + 1] = 'dep_mode'
  fields[#fields + 1] = ARGV[13]
end
if failed then
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = 'waiting'
  redis.call('HSET', KEYS[1], unpack(fields))
  local base = queue_base(KEYS[1], ARGV[1])
  fail_waiting(base, KEYS[1], ARGV[1], failed, failed_state, now, ARGV[12])
  return {1, 'dead', run_at, ARGV[1]}
end
if #waits > 0 then
  local base = queue_base(KEYS[1], ARGV[1])
  for _, dep in ipairs(waits) do
    redis.call('SADD', base .. 'dependents:' .. dep, ARGV[1])
    redis.call('HSET', base .. 'job:' .. dep, 'has_dependents', 1)
  end
  redis.call('SADD', base .. 'waiting:' .. ARGV[1], unpack(waits))
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = 'waiting'
  redis.call('HSET', KEYS[1], unpack(fields))
  return {1, 'waiting', run_at, ARGV[1]}
end
if run_at > now then
  redis.call('ZADD', KEYS[3], run_at, ARGV[1])
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = 'scheduled'
  redis.call('HSET', KEYS[1], unpack(fields))
  return {1, 'scheduled', run_at, ARGV[1]}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[8], '0', 'MKSTREAM')
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
fields[#fields + 1] = 'state'
fields[#fields + 1] = 'queued'
fields[#fields + 1] = 'entry'
fields[#fields + 1] = entry
redis.call('HSET', KEYS[1], unpack(fields))
return {1, 'queued', run_at, ARGV[1]}
