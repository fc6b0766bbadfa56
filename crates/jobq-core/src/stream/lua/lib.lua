-- Shared helpers, prepended to every script.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drops the job's unique lock when it is held until a terminal state and still names this job.
local function release_unique(jk, id)
  local u = redis.call('HMGET', jk, 'unique_key', 'unique_hold')
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

-- Moves a job to a terminal state: hash fields, unique lock, retention. Stream membership and
-- the event are the caller's business.
local function finish(jk, id, state, now, retention, err)
  redis.call('HSET', jk, 'state', state, 'finished_at', now)
  if err then redis.call('HSET', jk, 'last_error', err) end
  redis.call('HDEL', jk, 'lease', 'entry')
  release_unique(jk, id)
  if tonumber(retention) > 0 then redis.call('EXPIRE', jk, retention) end
end

-- Dead-letters a job: outbox event carrying the envelope, then state dead.
local function dead_letter(jk, events, id, reason, err, now, retention)
  attempt_event(events, jk, id, 'dead', now,
    {'error', err, 'reason', reason, 'envelope', redis.call('HGET', jk, 'envelope')})
  redis.call('HSET', jk, 'dead_reason', reason)
  finish(jk, id, 'dead', now, retention, err)
end

-- Completes a running attempt if `lease` still owns it: ack and delete the stream entry, mark
-- the job succeeded, write the outbox event, release its unique lock, set its retention.
-- Returns 1, or 0 when the lease is stale.
local function complete_one(jk, stream, events, id, lease, entry, group, result, retention)
  local cur = redis.call('HMGET', jk, 'state', 'lease')
  if cur[1] ~= 'running' or cur[2] ~= lease then
    return 0
  end
  local now = now_ms()
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  attempt_event(events, jk, id, 'succeeded', now, {})
  if result ~= '' then
    redis.call('HSET', jk, 'result', result)
  end
  finish(jk, id, 'succeeded', now, retention, nil)
  return 1
end
