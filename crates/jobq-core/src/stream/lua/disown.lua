-- Hand back the attempts a fetch started for a worker that never got its reply (it timed out, or
-- the connection dropped on the way back). A group delivers each stream in id order and a
-- fetch's jobs stay pending to its consumer until their outcome is written, so those attempts
-- are the entries pending to the consumer newer than the last one its worker received from
-- that stream. Each job still running on such an entry is handed back (lib.lua's hand_back):
-- the next reaper pass re-queues it, without counting a reclaim, instead of once its lease
-- lapses. The worker calls this after a failed fetch and before its next one of the queue.
-- With RENEW set, each such job's lease is renewed instead (XCLAIM ... JUSTID to the same
-- consumer, as the heartbeat does): the worker's heartbeat calls it for the attempts of a fetch
-- whose reply waits for a runtime thread that handlers hold, before the worker registers them;
-- the jobs it names after RENEW (attempts it has given up) are left to lapse.
-- KEYS: 1..4 priority streams (critical, high, normal, low)
-- ARGV: 1 group, 2 consumer, 3 job key prefix, 4..7 the last entry the worker received from
--       each stream ('' for none), 8 RENEW ('1') or not (''), 9.. ids of jobs not to renew
-- Returns the number of jobs handed back or renewed (none twice).
local idle = string.format('%d', now_ms() - 1)
local skip = {}
for k = 9, #ARGV do skip[ARGV[k]] = true end
local PAGE = 500
local n = 0
for i = 1, 4 do
  if is_stream(KEYS[i]) then
    local start = '-'
    if ARGV[3 + i] ~= '' then start = '(' .. ARGV[3 + i] end
    repeat
      local pending = redis.pcall('XPENDING', KEYS[i], ARGV[1], start, '+', PAGE, ARGV[2])
      -- Its group gone (NOGROUP): nothing is pending there.
      if pending.err then pending = {} end
      for _, p in ipairs(pending) do
        local entry = p[1]
        local e = redis.call('XRANGE', KEYS[i], entry, entry)[1]
        if e then
          local id = e[2][2]
          local jk = ARGV[3] .. id
          local h = job_fields(jk, 'state', 'entry', 'lease', 'given_up')
          if h[1] == 'running' and h[2] == entry and h[3] and h[4] ~= h[3] and not skip[id] then
            if ARGV[8] == '1' then
              n = n + #redis.call('XCLAIM', KEYS[i], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
            else
              n = n + hand_back(KEYS[i], ARGV[1], ARGV[2], entry, jk, h[3], idle)
            end
          end
        end
        start = '(' .. entry
      end
    until #pending < PAGE
  end
end
return n
