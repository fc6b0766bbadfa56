-- Shared helpers, prepended to every script.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The Redis clock in ms as a number and as a string. Hot scripts write the string: a Lua number
-- passed to redis.call is formatted with printf('%.17g') each time, the string is built once.
local function now_ms_pair()
  local t = redis.call('TIME')
  local us = t[2]
  local ms = string.sub(string.rep('0', 6 - #us) .. us, 1, 3)
  return tonumber(t[1]) * 1000 + tonumber(ms), t[1] .. ms
end

-- A job's hash as read by redis.pcall('HMGET', ...) (hot scripts call it themselves, then
-- this only when it answered an error): a key of another type in its place (written by
-- something other than jobq) reads as a job that is gone, with a warning in Redis' log, instead
-- of failing the script and with it every other job of the call.
local function not_a_job(jk, reply)
  redis.log(redis.LOG_WARNING, 'jobq: ' .. jk .. ' is not a job hash (' .. tostring(reply.err) .. ')')
  return {}
end

-- Whether the key holds a stream (TYPE, in place of EXISTS). A key of another type in a
-- priority stream's place (written by something other than jobq) reads as no stream, with a
-- warning in Redis' log, instead of failing the script for the queue's other streams.
local function is_stream(key)
  local t = redis.call('TYPE', key).ok
  if t == 'stream' then return true end
  if t ~= 'none' then redis.log(redis.LOG_WARNING, 'jobq: ' .. key .. ' is a ' .. t .. ', not a stream') end
  return false
end

-- HMGET of a job's hash, a key of another type reading as a job that is gone (not_a_job).
local function job_fields(jk, ...)
  local h = redis.pcall('HMGET', jk, ...)
  if h.err then return not_a_job(jk, h) end
  return h
end

-- Drops the job's unique lock when it is held until a terminal state and still names this job.
-- u: the job's {unique_key, unique_hold} when the caller has read them already.
local function release_unique(jk, id, u)
  u = u or redis.call('HMGET', jk, 'unique_key', 'unique_hold')
  if u[1] and u[2] == 'terminal' and redis.call('GET', u[1]) == id then
    redis.call('DEL', u[1])
  end
end

-- Writes an outbox event for the job's current attempt. extra: flat list of field/value pairs.
local function attempt_event(events, jk, id, outcome, now, extra)
  local h = redis.call('HMGET', jk, 'run', 'attempt', 'type', 'started_at', 'worker')
  local fields = {'id', id, 'run', h[1] or '1', 'attempt', h[2] or '0', 'outcome', outcome, 'type', h[3] or '',
    'started_at', h[4] or '', 'finished_at', now, 'worker', h[5] or ''}
  for _, v in ipairs(extra) do fields[#fields + 1] = v end
  redis.call('XADD', events, '*', unpack(fields))
  -- Per-queue counters by outcome, in the queue's stats hash (same slot as the outbox).
  redis.call('HINCRBY', string.sub(events, 1, -7) .. 'stats', outcome, 1)
end

-- Deletes the keys of a list of any length (DEL takes at most 500 at a time here, well within
-- what unpack can pass).
local function del_keys(keys)
  for k = 1, #keys, 500 do
    redis.call('DEL', unpack(keys, k, math.min(k + 499, #keys)))
  end
end

-- The queue's key prefix (`<ns>:{q:<queue>}:`) of a job hash key.
local function queue_base(jk, id)
  return string.sub(jk, 1, #jk - #id - 4)
end

-- Puts a job that waited for its dependencies into its stream, or into the scheduled set when
-- its run_at is still ahead. `released_at` (ms) tells a queue's bulk cancel or run that the job
-- was still waiting when it began (queue_jobs.lua).
local function release_waiting(base, jk, id, now)
  local h = redis.call('HMGET', jk, 'prio', 'run_at')
  local run_at = tonumber(h[2] or '0')
  if run_at > now then
    redis.call('ZADD', base .. 'scheduled', run_at, id)
    redis.call('HSET', jk, 'state', 'scheduled', 'released_at', now)
    return
  end
  local stream = base .. 'stream:' .. h[1]
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
  local entry = redis.call('XADD', stream, '*', 'id', id)
  redis.call('HSET', jk, 'state', 'queued', 'entry', entry, 'run_at', now, 'released_at', now)
end

-- A job that goes back to waiting for a start (held back by a limit, or re-queued after its
-- worker stopped) has its deadline, if any, tracked again in the expiring set: the promoter drops
-- the member of a job that is running when its deadline passes.
local function track_expiry(jk, id)
  local at = redis.call('HGET', jk, 'expires_at')
  if at then redis.call('ZADD', queue_base(jk, id) .. 'expiring', at, id) end
end

-- Moves a job of the scheduled set (scheduled or retrying) into its priority stream now, with
-- run_at now, as the promoter moves it once due.
local function queue_now(jk, id, stream, scheduled, now_s)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
  redis.call('ZREM', scheduled, id)
  local entry = redis.call('XADD', stream, '*', 'id', id)
  redis.call('HSET', jk, 'state', 'queued', 'entry', entry, 'run_at', now_s)
end

-- Sets a finished job's hash to expire after `retention` seconds (0: never), or later while
-- its unique key, held for a time, still names it, so that a duplicate keeps finding the job.
-- u: the job's {unique_key, unique_hold}.
local function expire_finished(jk, id, retention, u)
  if tonumber(retention) <= 0 then return end
  local lock_ms = 0
  if u[2] == 'ttl' and redis.call('GET', u[1]) == id then lock_ms = redis.call('PTTL', u[1]) end
  if lock_ms > 1000 * tonumber(retention) then
    redis.call('PEXPIRE', jk, lock_ms)
  else
    redis.call('EXPIRE', jk, retention)
  end
end

-- Dead-letters a job that waits for a dependency that will never succeed.
local function fail_waiting(base, jk, id, cause, cause_state, now, retention)
  local err = 'dependency ' .. cause .. ' is ' .. cause_state
  attempt_event(base .. 'events', jk, id, 'dead', now,
    {'error', err, 'reason', 'dependency_failed', 'envelope', redis.call('HGET', jk, 'envelope')})
  redis.call('HSET', jk, 'dead_reason', 'dependency_failed', 'state', 'dead', 'finished_at', now, 'last_error', err)
  redis.call('DEL', base .. 'waiting:' .. id)
  local u = redis.call('HMGET', jk, 'unique_key', 'unique_hold', 'expires_at')
  release_unique(jk, id, u)
  expire_finished(jk, id, retention, u)
  if u[3] then redis.call('ZREM', base .. 'expiring', id) end
end

-- A job reached a terminal state: the jobs waiting for it (same queue) lose one dependency.
-- A dependent whose last dependency succeeded is queued; one whose dependency died or was
-- cancelled is dead-lettered (reason dependency_failed) unless it waits for its dependencies
-- to finish in any state (dep_mode finished), and so on down the chain.
local function release_dependents(jk, id, state, now, retention)
  local base = queue_base(jk, id)
  local work = {{id, state}}
  local i = 1
  while i <= #work do
    local done_id, done_state = work[i][1], work[i][2]
    i = i + 1
    local key = base .. 'dependents:' .. done_id
    for _, dep in ipairs(redis.call('SMEMBERS', key)) do
      local djk = base .. 'job:' .. dep
      local h = redis.call('HMGET', djk, 'state', 'dep_mode')
      if h[1] == 'waiting' then
        if done_state ~= 'succeeded' and h[2] ~= 'finished' then
          fail_waiting(base, djk, dep, done_id, done_state, now, retention)
          work[#work + 1] = {dep, 'dead'}
        else
          local wkey = base .. 'waiting:' .. dep
          redis.call('SREM', wkey, done_id)
          if redis.call('SCARD', wkey) == 0 then
            release_waiting(base, djk, dep, now)
          end
        end
      end
    end
    redis.call('DEL', key)
  end
end

-- Moves a job to a terminal state: hash fields, unique lock, retention, its member of the
-- expiring set, dependents. Stream membership and the event are the caller's business.
local function finish(jk, id, state, now, retention, err)
  redis.call('HSET', jk, 'state', state, 'finished_at', now)
  if err then redis.call('HSET', jk, 'last_error', err) end
  redis.call('HDEL', jk, 'lease', 'entry')
  local h = redis.call('HMGET', jk, 'unique_key', 'unique_hold', 'dep_mode', 'has_dependents', 'expires_at')
  release_unique(jk, id, h)
  expire_finished(jk, id, retention, h)
  if h[5] then redis.call('ZREM', queue_base(jk, id) .. 'expiring', id) end
  if h[3] then redis.call('DEL', queue_base(jk, id) .. 'waiting:' .. id) end
  if h[4] then release_dependents(jk, id, state, now, retention) end
end

-- Dead-letters a job: outbox event carrying the envelope, then state dead.
local function dead_letter(jk, events, id, reason, err, now, retention)
  attempt_event(events, jk, id, 'dead', now,
    {'error', err, 'reason', reason, 'envelope', redis.call('HGET', jk, 'envelope')})
  redis.call('HSET', jk, 'dead_reason', reason)
  finish(jk, id, 'dead', now, retention, err)
end

-- Registers CONSUMER's LEASE_S (ms, as a string) in the leases hash until NOW + FOR_MS, unless a
-- registration of the same lease already lasts longer. Value: "lease_ms until_ms".
local function register_lease(key, consumer, lease_s, for_ms, now)
  local until_ms = now + for_ms
  local cur = redis.call('HGET', key, consumer)
  if cur then
    local lease, old_until = string.match(cur, '^(%d+) (%d+)$')
    if lease == lease_s and tonumber(old_until) >= until_ms then return end
  end
  redis.call('HSET', key, consumer, lease_s .. ' ' .. string.format('%d', until_ms))
  -- The hash outlives its longest registration by a second, then goes: no key is left behind
  -- once every worker of the queue has stopped.
  if redis.call('PTTL', key) < for_ms + 1000 then
    redis.call('PEXPIRE', key, for_ms + 1000)
  end
end

-- Hands attempt LEASE of the job at JK, pending on ENTRY of STREAM, back to the reaper: the
-- entry stays pending to CONSUMER with an idle time as long as Redis allows (delivered at the
-- epoch's first millisecond: XCLAIM takes an idle time past now as 0), past any lease a worker
-- holds, so that the next reaper pass of any worker takes it; and the job is marked `given_up`
-- with that lease, so that the reaper re-queues it without counting a reclaim (max_reclaims
-- catches jobs that crash their worker). IDLE: now in ms minus one, as a string.
-- Returns 1, or 0 when the entry is no longer pending.
local function hand_back(stream, group, consumer, entry, jk, lease, idle)
  local claimed = redis.call('XCLAIM', stream, group, consumer, 0, entry, 'IDLE', idle, 'JUSTID')
  if #claimed ~= 1 then return 0 end
  redis.call('HSET', jk, 'given_up', lease)
  return 1
end
