-- Renew the leases of running jobs: XCLAIM ... JUSTID to the same consumer resets each pending
-- entry's idle time. Reports per job whether a cancel was requested or the lease was lost.
-- KEYS: 1..4 priority streams (critical, high, normal, low)
-- ARGV: 1 group, 2 consumer, 3 job key prefix, then per job: priority index, entry, id, lease
-- Returns one status per job: 0 held, 1 held and cancel requested, 2 lease lost.
local out = {}
for i = 4, #ARGV, 4 do
  local stream = KEYS[tonumber(ARGV[i])]
  local entry, id, lease = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local h = job_fields(ARGV[3] .. id, 'state', 'lease', 'cancel_requested')
  local status = 2
  if h[1] == 'running' and h[2] == lease then
    -- A stream whose group is gone (NOGROUP) holds the lease no more: lost, for this job only.
    local claimed = redis.pcall('XCLAIM', stream, ARGV[1], ARGV[2], 0, entry, 'JUSTID')
    if not claimed.err and #claimed == 1 then
      status = 0
      if h[3] == '1' then status = 1 end
    end
  end
  out[#out + 1] = status
end
return out
