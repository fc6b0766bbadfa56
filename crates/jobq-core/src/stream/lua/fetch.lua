-- Start up to COUNT jobs of one queue, strictly by priority: a non-blocking XREADGROUP on each
-- priority stream in turn (critical first), asking only for the slots still free. Each started
-- job gets state running, attempt + 1 and a fresh lease token. A job past its expires_at is
-- dead-lettered (reason expired) instead; entries whose job is gone or no longer queued on
-- that entry are acked and deleted. A paused queue starts nothing.
-- KEYS: 1..4 priority streams (critical, high, normal, low), 5 events stream, 6 pause flag
-- ARGV: 1 group, 2 consumer, 3 count, 4 job key prefix, 5 dead retention seconds
-- A stream is read again while it filled its read but some entries started nothing (expired or
-- stale), so that such entries at the head of a stream never let a lower priority start first.
-- At most SKIP_LIMIT such entries are handled per call; past it the call returns more = 1 and
-- starts nothing of a lower priority. A stream is read only when XLEN finds entries in it: an
-- XLEN costs Redis a fraction of an XREADGROUP that finds nothing, and the higher priorities are
-- empty most of the time.
-- Returns {jobs, last_ids, paused, now, more}: jobs is a flat list of 3-tuples
--   (head, envelope, last checkpoint or ''), head being 'id entry priority-index attempt lease
--   run attempts-over-all-runs' in one string (one reply value instead of seven: fewer to
--   convert here and to parse in the worker);
-- last_ids (only when nothing was started) holds each stream's last generated id, so the caller
-- can block on XREAD for anything newer without a race ('' for a key of another type). now is the Redis clock in ms, each
-- started job's started_at.
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {{}, {}, 1, '', 0}
end
local now, now_s = now_ms_pair()
local want = tonumber(ARGV[3])
local consumer, prefix = ARGV[2], ARGV[4]
local jobs = {}
-- Priority indexes as strings, for the head.
local PRIO = {'1', '2', '3', '4'}
local SKIP_LIMIT = 1000
local skipped = 0
local more = 0
-- A counter of the job hash plus one, as a string. A counter not yet written (every job's first
-- attempt) needs no formatting: a number given to redis.call goes through printf('%.17g'), and
-- string.format costs about as much.
local function succ(s)
  if not s then return '1' end
  return string.format('%d', (tonumber(s) or 0) + 1)
end
for i = 1, 4 do
  if want <= 0 or more == 1 then break end
  local len = redis.pcall('XLEN', KEYS[i])
  if type(len) == 'table' then
    -- A key of another type (written by something other than jobq): passed over, with a
    -- warning in Redis' log, instead of failing the script for the queue's other streams.
    redis.log(redis.LOG_WARNING, 'jobq: ' .. KEYS[i] .. ' is not a stream (' .. tostring(len.err) .. ')')
    len = 0
  end
  local reading = len > 0
  while reading and want > 0 do
    if skipped >= SKIP_LIMIT then
      more = 1
      break
    end
    local asked = want
    local res = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', asked, 'STREAMS', KEYS[i], '>')
    if res and res.err then
      -- Its group gone (NOGROUP): this stream is passed over, and the jobs started from the
      -- others are returned rather than left pending by a failed script.
      redis.log(redis.LOG_WARNING, 'jobq: ' .. KEYS[i] .. ' cannot be read (' .. res.err .. ')')
      res = false
    end
    -- A read short of what it asked for emptied the stream of undelivered entries.
    reading = res and #res[1][2] == asked
    if res then
      for _, e in ipairs(res[1][2]) do
        local entry = e[1]
        local id = e[2][2]
        local jk = prefix .. id
        -- One read and one write per job: the counters are incremented here, not with HINCRBY.
        -- A job marked plain (enqueue.lua) has no deadline, and one never started (no attempt
        -- counted yet) no checkpoint: only other jobs are read for them.
        local st = redis.pcall('HMGET', jk, 'state', 'entry', 'plain', 'attempt', 'lease_seq', 'attempts_total', 'run',
          'envelope')
        if st.err then st = not_a_job(jk, st) end
        if st[1] == 'queued' and st[2] == entry then
          local expires_at, checkpoint = nil, nil
          if not st[3] or st[4] or st[6] then
            local x = redis.call('HMGET', jk, 'expires_at', 'checkpoint')
            expires_at, checkpoint = x[1], x[2]
          end
          if expires_at and now >= tonumber(expires_at) then
            redis.call('XACK', KEYS[i], ARGV[1], entry)
            redis.call('XDEL', KEYS[i], entry)
            dead_letter(jk, KEYS[5], id, 'expired', 'expired before it started', now, ARGV[5])
            skipped = skipped + 1
          else
            -- The lease token doubles as the lease counter.
            local lease_s, attempt_s, total_s = succ(st[5]), succ(st[4]), succ(st[6])
            redis.call('HSET', jk, 'state', 'running', 'started_at', now_s, 'lease', lease_s, 'worker', consumer,
              'attempt', attempt_s, 'lease_seq', lease_s, 'attempts_total', total_s)
            local n = #jobs
            jobs[n + 1] = id .. ' ' .. entry .. ' ' .. PRIO[i] .. ' ' .. attempt_s .. ' ' .. lease_s .. ' ' .. (st[7] or '1')
              .. ' ' .. total_s
            jobs[n + 2] = st[8]
            jobs[n + 3] = checkpoint or ''
            want = want - 1
          end
        else
          redis.call('XACK', KEYS[i], ARGV[1], entry)
          redis.call('XDEL', KEYS[i], entry)
          skipped = skipped + 1
        end
      end
    end
  end
end
local last_ids = {}
if #jobs == 0 and more == 0 then
  for i = 1, 4 do
    local last = '0-0'
    if is_stream(KEYS[i]) then
      local info = redis.call('XINFO', 'STREAM', KEYS[i])
      for k = 1, #info, 2 do
        if info[k] == 'last-generated-id' then last = info[k + 1] end
      end
    elseif redis.call('EXISTS', KEYS[i]) == 1 then
      -- A key of another type: nothing to wait on there.
      last = ''
    end
    last_ids[i] = last
  end
end
return {jobs, last_ids, 0, now_s, more}
