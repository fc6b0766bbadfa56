-- Hand back running attempts a worker gave up at shutdown (past its shutdown timeout, with no
-- outcome to write). Their entries stay pending, as after a crash, but a graceful stop is not
-- one: each job still running on its lease is marked `given_up` with that lease, so that the
-- reaper re-queues it without counting a reclaim (max_reclaims catches jobs that crash their
-- worker), and its entry's idle time is set as long as Redis allows (delivered at the epoch's
-- first millisecond: XCLAIM takes an idle time past now as 0), past any lease a worker holds,
-- so that the next reaper pass takes it instead of one a lease later.
-- KEYS: 1..4 priority streams (critical, high, normal, low)
-- ARGV: 1 group, 2 consumer, 3 job key prefix, then per job: priority index, entry, id, lease
-- Returns the number of jobs handed back.
local idle = string.format('%d', now_ms() - 1)
local n = 0
for i = 4, #ARGV, 4 do
  local stream = KEYS[tonumber(ARGV[i])]
  local entry, id, lease = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local jk = ARGV[3] .. id
  local h = redis.call('HMGET', jk, 'state', 'lease')
  if h[1] == 'running' and h[2] == lease then
    local claimed = redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, entry, 'IDLE', idle, 'JUSTID')
    if #claimed == 1 then
      redis.call('HSET', jk, 'given_up', lease)
      n = n + 1
    end
  end
end
return n
