-- Cancel, or run now, the jobs of one queue that have not started, a bounded slice per call.
-- Cancel takes the jobs waiting for their run_at in the scheduled set (delayed, held back,
-- retrying) and the queued ones (their priority streams' entries after the group's last
-- delivered one), each as cancel.lua cancels one: its member or entry goes, state cancelled,
-- unique lock, dependents. Run moves jobs of the scheduled set into their priority streams,
-- each as run_now.lua moves one. A job that started meanwhile, or is in a state not asked for,
-- or of another type, is left.
-- The scheduled set is walked first, with ZSCAN (every member there from the first call to the
-- last is seen, whatever is added or removed meanwhile; a member may be seen twice while the set
-- is resized: the count of a dry run is then high by as many), then each stream from its
-- group's last delivered entry as it is when that stream's walk begins, so that a job the
-- promoter moves meanwhile from the set into a stream is still found. A job released from
-- waiting for its dependencies since the first call (by this walk's cancels or by a worker) is
-- left: it was waiting when the walk began, a state neither takes, so that what a walk takes
-- does not depend on the order of the streams (the cancel of a batch's last job queues its
-- on_complete callback, which then runs, as after cancelling the jobs one by one). While the
-- queue runs, a dry run can also count twice a due job the promoter moves from the set into a
-- stream behind the walk.
-- KEYS: 1..4 priority streams (critical, high, normal, low), 5 scheduled zset
-- ARGV: 1 job key prefix, 2 retention seconds, 3 about how many entries and members to look at,
--       4 type or '', 5 states to take (' queued scheduled retrying ', a subset; never queued
--       to run), 6 'cancel', 'run' or 'count' (count what cancel or run would take), 7..10 per
--       stream the last entry looked at ('' to start after the group's last delivered entry,
--       '-' once the stream is done), 11 the scheduled set's ZSCAN cursor ('' to start, '-'
--       once it is done), 12 most jobs to take, 13 the Redis time (ms) of the walk's first call
--       ('' in the first call)
-- Returns {jobs taken (or counted), cursor 1..4, scheduled cursor, the walk's first call's time};
-- every cursor '-' means the queue is done.
local prefix, retention, budget = ARGV[1], ARGV[2], tonumber(ARGV[3])
local kind, states, mode = ARGV[4], ARGV[5], ARGV[6]
local most = tonumber(ARGV[12])
local now, now_s = now_ms_pair()
local began_s = ARGV[13] ~= '' and ARGV[13] or now_s
local began = tonumber(began_s)
-- Released from waiting since the walk began.
local function released(at)
  return at and tonumber(at) >= began
end
local index = { critical = 1, high = 2, normal = 3, low = 4 }
local n = 0
local function wanted(state, t)
  return string.find(states, ' ' .. state .. ' ', 1, true) and (kind == '' or t == kind)
end
local zc = ARGV[11]
if not (string.find(states, ' scheduled ', 1, true) or string.find(states, ' retrying ', 1, true)) then zc = '-' end
if zc ~= '-' and budget > 0 and n < most then
  local r = redis.call('ZSCAN', KEYS[5], zc == '' and '0' or zc, 'COUNT', budget)
  local members, stopped = r[2], false
  for k = 1, #members, 2 do
    if n >= most then
      -- The rest of this page is read again by the next call (ZSCAN cannot resume mid-page):
      -- the members taken are gone from it by then.
      stopped = true
      break
    end
    local id = members[k]
    local jk = prefix .. id
    local h = redis.call('HMGET', jk, 'state', 'type', 'prio', 'released_at')
    if (h[1] == 'scheduled' or h[1] == 'retrying') and wanted(h[1], h[2]) and index[h[3]] and not released(h[4]) then
      n = n + 1
      if mode == 'cancel' then
        redis.call('ZREM', KEYS[5], id)
        finish(jk, id, 'cancelled', now, retention, nil)
      elseif mode == 'run' then
        queue_now(jk, id, KEYS[index[h[3]]], KEYS[5], now_s)
      end
    end
  end
  if not stopped then
    if r[1] == '0' then zc = '-' else zc = r[1] end
  end
  budget = budget - #members / 2
end
local cursors = {}
for i = 1, 4 do
  local c = ARGV[6 + i]
  if not string.find(states, ' queued ', 1, true) then c = '-' end
  if c ~= '-' and zc == '-' and budget > 0 and n < most then
    if c == '' then
      c = '-'
      if redis.call('EXISTS', KEYS[i]) == 1 then
        for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i])) do
          local name, last
          for k = 1, #g, 2 do
            if g[k] == 'name' then name = g[k + 1] elseif g[k] == 'last-delivered-id' then last = g[k + 1] end
          end
          if name == GROUP then c = last end
        end
        if c == '-' then c = '0-0' end
      end
    end
    if c ~= '-' then
      local entries = redis.call('XRANGE', KEYS[i], '(' .. c, '+', 'COUNT', budget)
      local seen = 0
      for _, e in ipairs(entries) do
        if n >= most then break end
        local entry, id = e[1], e[2][2]
        local jk = prefix .. id
        local h = redis.call('HMGET', jk, 'state', 'entry', 'type', 'released_at')
        if h[1] == 'queued' and h[2] == entry and wanted('queued', h[3]) and not released(h[4]) then
          n = n + 1
          if mode == 'cancel' then
            redis.call('XDEL', KEYS[i], entry)
            finish(jk, id, 'cancelled', now, retention, nil)
          end
        end
        c = entry
        seen = seen + 1
      end
      -- A read short of the budget, all of it looked at, reached the end of the stream.
      if seen == #entries and #entries < budget then c = '-' end
      budget = budget - seen
    end
  end
  cursors[i] = c
end
return {n, cursors[1], cursors[2], cursors[3], cursors[4], zc, began_s}
