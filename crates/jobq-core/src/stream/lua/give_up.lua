-- Hand back running attempts a worker gave up at shutdown (past its shutdown timeout, with no
-- outcome to write). Their entries stay pending, as after a crash, but a graceful stop is not
-- one: each job still running on its lease is handed back (lib.lua's hand_back), so that the
-- next reaper pass re-queues it at once and without counting a reclaim.
-- KEYS: 1..4 priority streams (critical, high, normal, low)
-- ARGV: 1 group, 2 consumer, 3 job key prefix, then per job: priority index, entry, id, lease
-- Returns the number of jobs handed back.
local idle = string.format('%d', now_ms() - 1)
local n = 0
for i = 4, #ARGV, 4 do
  local entry, id, lease = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local jk = ARGV[3] .. id
  local h = job_fields(jk, 'state', 'lease')
  if h[1] == 'running' and h[2] == lease then
    n = n + hand_back(KEYS[tonumber(ARGV[i])], ARGV[1], ARGV[2], entry, jk, lease, idle)
  end
end
return n
