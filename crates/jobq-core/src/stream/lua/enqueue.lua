-- Enqueue jobs of one queue (one or a whole batch per call): create each job's hash, then put
-- it in its priority stream (ready now) or in the scheduled set (later). A unique key held by a
-- live job enqueues nothing and returns that job instead.
-- KEYS: 1..4 priority streams (critical, high, normal, low), 5 scheduled zset, 6 expiring zset
-- ARGV: 1 job key prefix, 2 dead retention seconds, then per job 12 fields and its dependencies:
--       id, envelope json, priority name, type, max_attempts, delay ms or '', run_at ms or '',
--       expires_at ms or '', unique key (the whole key, same queue) or '', unique ttl ms or '',
--       dependency mode ('' | 'succeeded' | 'finished' | 'finished-enqueued'), number of
--       dependencies, then their ids (jobs of the same queue). 'finished-enqueued' is 'finished'
--       for dependencies known to have been enqueued (a batch's callback): one whose hash is gone
--       has finished and left per retention, instead of being unknown.
-- Returns 4 values per job: created (1, 0 existing, -1 unknown dependency), state, run_at ms,
-- job id (the existing job's, or the unknown dependency's).
-- A job with unfinished dependencies waits (state waiting) until they finish; one whose
-- dependency is already dead or cancelled is dead-lettered at once (reason dependency_failed)
-- unless the mode is 'finished'.
local prefix, retention = ARGV[1], ARGV[2]
local stream_of = {critical = 1, high = 2, normal = 3, low = 4}
local grouped = {}
local now, now_s = now_ms_pair()
local out = {}

local function answer(created, state, run_at, id)
  local n = #out
  out[n + 1] = created
  out[n + 2] = state
  out[n + 3] = run_at
  out[n + 4] = id
end

local i = 3
while i <= #ARGV do
  local id, envelope, prio, kind, max_attempts = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local delay, at, expires_at, unique, unique_ttl = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
  local mode, ndeps = ARGV[i + 10], tonumber(ARGV[i + 11])
  local gone_finished = mode == 'finished-enqueued'
  if gone_finished then mode = 'finished' end
  local first_dep = i + 12
  i = first_dep + ndeps
  local jk = prefix .. id
  -- Every id is new (a UUIDv7 the broker draws per job, and a call is never run twice), so
  -- only a held unique key makes a duplicate: the job's own hash is not looked up.
  local existing, holder = nil, nil
  if unique ~= '' then
    holder = redis.call('GET', unique)
    if holder then existing = redis.call('HGET', prefix .. holder, 'state') end
  end
  if existing then
    answer(0, existing, tonumber(redis.call('HGET', prefix .. holder, 'run_at') or '0'), holder)
  else
    local waits, failed, failed_state, unknown = {}, nil, nil, nil
    if mode ~= '' then
      for d = first_dep, first_dep + ndeps - 1 do
        local st = redis.call('HGET', prefix .. ARGV[d], 'state')
        if not st and not gone_finished then
          unknown = ARGV[d]
          break
        end
        if not st then
          -- Finished and removed per retention: nothing to wait for.
        elseif st == 'dead' or st == 'cancelled' then
          if mode ~= 'finished' and not failed then failed, failed_state = ARGV[d], st end
        elseif st ~= 'succeeded' then
          waits[#waits + 1] = ARGV[d]
        end
      end
    end
    if unknown then
      answer(-1, 'unknown dependency', 0, unknown)
    else
      -- Times are written as strings: a Lua number given to redis.call goes through printf.
      local run_at, run_at_s = now, now_s
      if delay ~= '' then
        run_at = now + tonumber(delay)
        run_at_s = string.format('%d', run_at)
      elseif at ~= '' then
        run_at, run_at_s = tonumber(at), at
      end
      -- Counters (attempt, attempts_total, reclaims) start absent, read as 0.
      local fields = {'envelope', envelope, 'prio', prio, 'type', kind, 'max_attempts', max_attempts, 'run', '1',
        'run_at', run_at_s, 'enqueued_at', now_s}
      if expires_at ~= '' then
        fields[#fields + 1] = 'expires_at'
        fields[#fields + 1] = expires_at
        redis.call('ZADD', KEYS[6], expires_at, id)
      end
      if unique ~= '' then
        if unique_ttl ~= '' then
          redis.call('SET', unique, id, 'PX', unique_ttl)
        else
          redis.call('SET', unique, id)
        end
        fields[#fields + 1] = 'unique_key'
        fields[#fields + 1] = unique
        fields[#fields + 1] = 'unique_hold'
        fields[#fields + 1] = (unique_ttl ~= '' and 'ttl') or 'terminal'
      end
      if mode ~= '' then
        fields[#fields + 1] = 'dep_mode'
        fields[#fields + 1] = mode
      elseif expires_at == '' and unique == '' then
        -- None of the fields only an enqueue writes that the fetch and the completion would
        -- otherwise read (has_dependents and checkpoint, written later, they always read).
        fields[#fields + 1] = 'plain'
        fields[#fields + 1] = '1'
      end
      local n = #fields
      if failed then
        fields[n + 1] = 'state'
        fields[n + 2] = 'waiting'
        redis.call('HSET', jk, unpack(fields))
        fail_waiting(queue_base(jk, id), jk, id, failed, failed_state, now, retention)
        answer(1, 'dead', run_at, id)
      elseif #waits > 0 then
        local base = queue_base(jk, id)
        for _, dep in ipairs(waits) do
          redis.call('SADD', base .. 'dependents:' .. dep, id)
          redis.call('HSET', base .. 'job:' .. dep, 'has_dependents', 1)
        end
        redis.call('SADD', base .. 'waiting:' .. id, unpack(waits))
        fields[n + 1] = 'state'
        fields[n + 2] = 'waiting'
        redis.call('HSET', jk, unpack(fields))
        answer(1, 'waiting', run_at, id)
      elseif run_at > now then
        redis.call('ZADD', KEYS[5], run_at_s, id)
        fields[n + 1] = 'state'
        fields[n + 2] = 'scheduled'
        redis.call('HSET', jk, unpack(fields))
        answer(1, 'scheduled', run_at, id)
      else
        local s = stream_of[prio]
        if not grouped[s] then
          if redis.call('EXISTS', KEYS[s]) == 0 then
            redis.call('XGROUP', 'CREATE', KEYS[s], GROUP, '0', 'MKSTREAM')
          end
          grouped[s] = true
        end
        fields[n + 1] = 'state'
        fields[n + 2] = 'queued'
        fields[n + 3] = 'entry'
        fields[n + 4] = redis.call('XADD', KEYS[s], '*', 'id', id)
        redis.call('HSET', jk, unpack(fields))
        answer(1, 'queued', run_at, id)
      end
    end
  end
end
return out
