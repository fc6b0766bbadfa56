-- Move due jobs (scheduled and retrying whose run_at <= Redis TIME) from the scheduled set into
-- their priority streams, at most LIMIT per call, and dead-letter jobs whose expires_at passed
-- before they started (reason expired). Then delete the hashes of succeeded jobs whose retention
-- has ended (the due members of the retained zset, each naming the jobs of one complete_many
-- call), about LIMIT jobs per call.
-- KEYS: 1 scheduled zset, 2..5 priority streams (critical, high, normal, low),
--       6 expiring zset, 7 events stream, 8 retained zset
-- ARGV: 1 limit, 2 job key prefix, 3 group, 4 dead retention seconds
-- Returns {promoted, oldest still-due run_at ms or -1, now ms, expired, swept jobs, 1 when due
-- members were left for the next call or 0}
local now = now_ms()
local index = { critical = 2, high = 3, normal = 4, low = 5 }
local expired = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  local jk = ARGV[2] .. id
  local h = job_fields(jk, 'state', 'entry', 'prio', 'expires_at')
  -- The hash decides: a member can outlive the job's deadline (a DLQ retry starts a run with
  -- none).
  local due = h[4] and tonumber(h[4]) <= now
  if due and (h[1] == 'queued' or h[1] == 'scheduled' or h[1] == 'retrying' or h[1] == 'waiting') then
    if h[1] == 'queued' and h[2] and index[h[3]] then
      redis.call('XDEL', KEYS[index[h[3]]], h[2])
    end
    redis.call('ZREM', KEYS[1], id)
    dead_letter(jk, KEYS[7], id, 'expired', 'expired before it started', now, ARGV[4])
    expired = expired + 1
  end
  redis.call('ZREM', KEYS[6], id)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local promoted = 0
for _, id in ipairs(ids) do
  local jk = ARGV[2] .. id
  local h = job_fields(jk, 'state', 'prio')
  if (h[1] == 'scheduled' or h[1] == 'retrying') and index[h[2]] then
    local stream = KEYS[index[h[2]]]
    if redis.call('EXISTS', stream) == 0 then
      redis.call('XGROUP', 'CREATE', stream, ARGV[3], '0', 'MKSTREAM')
    end
    local entry = redis.call('XADD', stream, '*', 'id', id)
    redis.call('HSET', jk, 'state', 'queued', 'entry', entry)
    promoted = promoted + 1
  end
  redis.call('ZREM', KEYS[1], id)
end
local oldest = -1
local next_due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
if next_due[2] then oldest = tonumber(next_due[2]) end
-- Succeeded is a final state: a hash named here is not used for anything else any more. A few
-- members at a time (each names up to a whole complete_many call), until LIMIT jobs are gone.
local limit, swept, more = tonumber(ARGV[1]), 0, 0
while true do
  if swept >= limit then
    more = 1
    break
  end
  local due = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now, 'LIMIT', 0, 8)
  for _, ids in ipairs(due) do
    local keys = {}
    for id in string.gmatch(ids, '%S+') do
      keys[#keys + 1] = ARGV[2] .. id
    end
    del_keys(keys)
    swept = swept + #keys
  end
  if #due > 0 then redis.call('ZREM', KEYS[8], unpack(due)) end
  if #due < 8 then break end
end
return {promoted, oldest, now, expired, swept, more}
