-- Start up to COUNT jobs of one queue, strictly by priority: a non-blocking XREADGROUP on each
-- priority stream in turn (critical first), asking only for the slots still free. Each started
-- job gets state running, attempt + 1 and a fresh lease token. A job past its expires_at is
-- dead-lettered (reason expired) instead; entries whose job is gone or no longer queued on
-- that entry are acked and deleted. A paused queue starts nothing.
-- KEYS: 1..4 priority streams (critical, high, normal, low), 5 events stream, 6 pause flag
-- ARGV: 1 group, 2 consumer, 3 count, 4 job key prefix, 5 dead retention seconds
-- Returns {jobs, last_ids, paused}: jobs is a flat list of 9-tuples
--   (id, entry, priority index, attempt, lease, run, envelope, attempts over all runs,
--   last checkpoint or '');
-- last_ids (only when nothing was started) holds each stream's last generated id, so the caller
-- can block on XREAD for anything newer without a race.
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {{}, {}, 1}
end
local now = now_ms()
local want = tonumber(ARGV[3])
local jobs = {}
for i = 1, 4 do
  if want <= 0 then break end
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', KEYS[i], '>')
    if res then
      for _, e in ipairs(res[1][2]) do
        local entry = e[1]
        local id = e[2][2]
        local jk = ARGV[4] .. id
        local st = redis.call('HMGET', jk, 'state', 'entry', 'expires_at', 'cancel_requested')
        if st[1] == 'queued' and st[2] == entry then
          if st[3] and now >= tonumber(st[3]) then
            redis.call('XACK', KEYS[i], ARGV[1], entry)
            redis.call('XDEL', KEYS[i], entry)
            dead_letter(jk, KEYS[5], id, 'expired', 'expired before it started', now, ARGV[5])
          else
            local attempt = redis.call('HINCRBY', jk, 'attempt', 1)
            local lease = redis.call('HINCRBY', jk, 'lease_seq', 1)
            local total = redis.call('HINCRBY', jk, 'attempts_total', 1)
            redis.call('HSET', jk, 'state', 'running', 'started_at', now, 'lease', lease, 'worker', ARGV[2])
            local more = redis.call('HMGET', jk, 'run', 'envelope', 'checkpoint')
            jobs[#jobs + 1] = id
            jobs[#jobs + 1] = entry
            jobs[#jobs + 1] = i
            jobs[#jobs + 1] = attempt
            jobs[#jobs + 1] = lease
            jobs[#jobs + 1] = tonumber(more[1])
            jobs[#jobs + 1] = more[2]
            jobs[#jobs + 1] = total
            jobs[#jobs + 1] = more[3] or ''
            want = want - 1
          end
        else
          redis.call('XACK', KEYS[i], ARGV[1], entry)
          redis.call('XDEL', KEYS[i], entry)
        end
      end
    end
  end
end
local last_ids = {}
if #jobs == 0 then
  for i = 1, 4 do
    local last = '0-0'
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local info = redis.call('XINFO', 'STREAM', KEYS[i])
      for k = 1, #info, 2 do
        if info[k] == 'last-generated-id' then last = info[k + 1] end
      end
    end
    last_ids[i] = last
  end
end
return {jobs, last_ids, 0}
