-- Reclaim jobs whose worker stopped heartbeating: XAUTOCLAIM entries idle past the lease, then
-- for each job still running on that entry: re-queue it (new entry, lease revoked, the crashed
-- attempt not counted), or cancel it (a cancel was requested), or dead-letter it once it has
-- been reclaimed more than MAX_RECLAIMS times (a poison job that kills its worker). A job its
-- worker gave up at a graceful stop (give_up.lua) is re-queued without counting a reclaim.
-- Entries whose content Redis reports deleted are counted (an alarm: it should not happen).
-- Workers of a queue may run with different leases: each registers its own in the queue's
-- leases hash (consumer -> "lease_ms until_ms", until = when the registration lapses unless
-- renewed; renewed here and by the worker's heartbeat), and an entry is taken only once idle
-- past the longest lease registered and not lapsed, so that no worker takes a job whose own
-- worker still renews it.
-- KEYS: 1..4 priority streams, 5 events stream, 6 leases hash
-- ARGV: 1 group, 2 consumer, 3 lease ms, 4 count, 5 job key prefix, 6 max reclaims,
--       7 dead retention seconds, 8 ms this registration holds without renewal
-- Returns {requeued, dead, cancelled, deleted, min idle ms used}
local now = now_ms()
local requeued, dead, cancelled, deleted = 0, 0, 0, 0
local budget = tonumber(ARGV[4])
register_lease(KEYS[6], ARGV[2], ARGV[3], tonumber(ARGV[8]), now)
local min_idle = tonumber(ARGV[3])
local leases = redis.call('HGETALL', KEYS[6])
for k = 1, #leases, 2 do
  local lease, until_ms = string.match(leases[k + 1], '^(%d+) (%d+)$')
  if not lease or tonumber(until_ms) < now then
    redis.call('HDEL', KEYS[6], leases[k])
  elseif tonumber(lease) > min_idle then
    min_idle = tonumber(lease)
  end
end
local min_idle_s = string.format('%d', min_idle)
for i = 1, 4 do
  if budget <= 0 then break end
  if is_stream(KEYS[i]) then
    local cursor = '0-0'
    repeat
      local r = redis.pcall('XAUTOCLAIM', KEYS[i], ARGV[1], ARGV[2], min_idle_s, cursor, 'COUNT', budget)
      -- Its group gone (NOGROUP): nothing to reclaim there.
      if r.err then r = {'0-0', {}, {}} end
      cursor = r[1]
      deleted = deleted + #r[3]
      for _, e in ipairs(r[2]) do
        budget = budget - 1
        local entry = e[1]
        redis.call('XACK', KEYS[i], ARGV[1], entry)
        redis.call('XDEL', KEYS[i], entry)
        if e[2] then
          local id = e[2][2]
          local jk = ARGV[5] .. id
          local h = job_fields(jk, 'state', 'entry', 'cancel_requested', 'lease', 'given_up')
          if h[1] == 'running' and h[2] == entry then
            -- An attempt its worker gave up at a graceful stop (give_up.lua) is not a crash.
            local n = 0
            if h[5] and h[5] == h[4] then
              redis.call('HDEL', jk, 'given_up')
            else
              n = redis.call('HINCRBY', jk, 'reclaims', 1)
              redis.call('HSET', jk, 'last_reclaimed_at', now)
            end
            -- A terminal event names the crashed attempt itself (an earlier attempt has its own
            -- history row); after it, and before a re-queue, the crashed attempt stops counting
            -- against max_attempts.
            if h[3] == '1' then
              attempt_event(KEYS[5], jk, id, 'cancelled', now, {'error', 'cancelled; its worker stopped'})
              finish(jk, id, 'cancelled', now, ARGV[7], 'cancelled; its worker stopped')
              redis.call('HINCRBY', jk, 'attempt', -1)
              cancelled = cancelled + 1
            elseif n > tonumber(ARGV[6]) then
              dead_letter(jk, KEYS[5], id, 'max_reclaims',
                'its worker stopped while running it ' .. n .. ' times (max_reclaims ' .. ARGV[6] .. ')', now, ARGV[7])
              redis.call('HINCRBY', jk, 'attempt', -1)
              dead = dead + 1
            else
              redis.call('HINCRBY', jk, 'attempt', -1)
              local fresh = redis.call('XADD', KEYS[i], '*', 'id', id)
              redis.call('HSET', jk, 'state', 'queued', 'entry', fresh)
              redis.call('HDEL', jk, 'lease')
              track_expiry(jk, id)
              requeued = requeued + 1
            end
          end
        end
      end
    until cursor == '0-0' or budget <= 0
  end
end
return {requeued, dead, cancelled, deleted, min_idle}
