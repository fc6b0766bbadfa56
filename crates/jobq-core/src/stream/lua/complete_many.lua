-- Complete many running attempts of one queue in one call (see complete_one in lib.lua).
-- KEYS: 1..4 priority streams (critical, high, normal, low), 5 events stream
-- ARGV: 1 group, 2 retention seconds, 3 job key prefix,
--       then per job: priority index, id, lease token, entry id, result json or ''
-- Returns one 1 (completed) or 0 (stale lease) per job.
local out = {}
for i = 4, #ARGV, 5 do
  local id = ARGV[i + 1]
  out[#out + 1] = complete_one(ARGV[3] .. id, KEYS[tonumber(ARGV[i])], KEYS[5], id, ARGV[i + 2], ARGV[i + 3],
    ARGV[1], ARGV[i + 4], ARGV[2])
end
return out
