-- Remove consumers that have no pending entries and have been idle longer than IDLE_MS, so
-- consumer names of stopped processes do not pile up. Atomic: no entry can be delivered to a
-- consumer between the check and the removal (a consumer removed with pending entries would
-- make them unclaimable). A live but idle consumer is simply created again by its next read.
-- KEYS: streams (one slot)
-- ARGV: 1 group, 2 idle ms
-- Returns the number of consumers removed.
local removed = 0
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, ARGV[1])
    if ok then
      for _, c in ipairs(consumers) do
        local f = {}
        for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
        if tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[2]) then
          redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], f['name'])
          removed = removed + 1
        end
      end
    end
  end
end
return removed
