-- Move due jobs (scheduled and retrying whose run_at <= Redis TIME) from the scheduled set into
-- their priority streams, at most LIMIT per call.
-- KEYS: 1 scheduled zset, 2..5 priority streams (critical, high, normal, low)
-- ARGV: 1 limit, 2 job key prefix, 3 group
-- Returns {promoted, oldest still-due run_at ms or -1, now ms}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local index = { critical = 2, high = 3, normal = 4, low = 5 }
local promoted = 0
for _, id in ipairs(ids) do
  local jk = ARGV[2] .. id
  local h = redis.call('HMGET', jk, 'state', 'prio')
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
return {promoted, oldest, now}
