-- Complete many running attempts of one queue in one call. Each attempt whose `lease` still owns
-- it is marked succeeded (hash fields, result, unique lock, dependents, its member of the
-- expiring set, as `finish` does), and
-- the hashes kept for the retention are named together by one member of the retained zset,
-- scored by the end of their retention, which the promoter sweeps. With a retention of 0, a
-- hash is deleted instead once its lock and dependents are released (the outbox event still
-- carries the attempt to the history). A job whose unique key is held for a time, and still
-- names it, stays at least until the key expires, so that a duplicate keeps finding it. Then, once for the whole call, their stream entries are XACKed and deleted (per
-- priority stream one XACK, one XTRIM MINID up to the oldest entry still pending, and one XDEL
-- of those newer than it), the outbox gets their events and the queue's succeeded counter goes
-- up by their number. One completed attempt is written as a plain outbox event (as fail.lua
-- writes); several as one batch event: `outcome` succeeded, `finished_at`, and `batch`, a JSON
-- array of six strings per attempt (id, run, attempt, type, started_at, worker).
-- The caller sends that array for every job of the call (what its fetch returned: a lease that
-- still owns the attempt vouches for run, attempt, started_at and worker); when every lease
-- holds, it goes to the outbox as it is, and only the completed attempts' part otherwise.
-- KEYS: 1..4 priority streams (critical, high, normal, low), 5 events stream, 6 retained zset
-- ARGV: 1 group, 2 retention seconds (0: delete the hash), 3 job key prefix, 4 the batch array
--       (JSON), 5..8 per priority stream the newest entry id of the call's jobs on it ('' for
--       none), then per job: priority index, id, lease token, entry id, result json or ''
-- Returns one 1 (completed), 2 (completed by an earlier call on the same lease) or 0 (stale
-- lease) per job.
local now, now_s = now_ms_pair()
local retention = ARGV[2]
local keep = tonumber(retention) > 0
local out = {}
-- Entries to ack per stream, by the priority index as the caller sent it (no tonumber per job);
-- ARGV and the key prefix in locals (a global lookup per use otherwise).
local entries = {['1'] = {}, ['2'] = {}, ['3'] = {}, ['4'] = {}}
local argv, prefix = ARGV, ARGV[3]
-- Hashes to delete (no retention), with one DEL per call; ids of the hashes kept for the
-- retention, with one ZADD per call.
local gone, kept = {}, {}
-- The optional fields of a job marked plain: none.
local NONE = {}
local n = 0
for i = 9, #argv, 5 do
  local id, lease = argv[i + 1], argv[i + 2]
  local jk = prefix .. id
  -- A job marked plain (enqueue.lua) has no unique lock, dependencies or deadline; any other
  -- is read for them. Dependents can be added to any job at any time: always read.
  local h = redis.pcall('HMGET', jk, 'state', 'lease', 'plain', 'has_dependents')
  if h.err then h = not_a_job(jk, h) end
  local x = NONE
  if h[1] == 'running' and h[2] == lease and not h[3] then
    x = redis.call('HMGET', jk, 'unique_key', 'unique_hold', 'dep_mode', 'expires_at')
  end
  if h[1] ~= 'running' or h[2] ~= lease then
    -- Succeeded on this very lease: an earlier call wrote it and its reply was lost, and the
    -- worker sent the outcome again. Reported as written (2), changing nothing; a hash already
    -- deleted (no retention) reads as stale.
    if h[1] == 'succeeded' and h[2] == lease then out[#out + 1] = 2 else out[#out + 1] = 0 end
  else
    out[#out + 1] = 1
    n = n + 1
    local e = entries[argv[i]]
    e[#e + 1] = argv[i + 3]
    if x[1] then release_unique(jk, id, {x[1], x[2]}) end
    if x[3] then redis.call('DEL', queue_base(jk, id) .. 'waiting:' .. id) end
    if h[4] then release_dependents(jk, id, 'succeeded', now, retention) end
    if x[4] then redis.call('ZREM', queue_base(jk, id) .. 'expiring', id) end
    -- With no retention the hash goes now (one DEL for the whole call instead of an HSET per
    -- job), unless a unique lock held for a time still names the job: then it stays as long
    -- as the lock, so that an enqueue with the same key keeps getting this job back.
    local lock_ms = 0
    if x[2] == 'ttl' and redis.call('GET', x[1]) == id then
      lock_ms = redis.call('PTTL', x[1])
    end
    if keep or lock_ms > 0 then
      if argv[i + 4] ~= '' then
        redis.call('HSET', jk, 'state', 'succeeded', 'finished_at', now_s, 'result', argv[i + 4])
      else
        redis.call('HSET', jk, 'state', 'succeeded', 'finished_at', now_s)
      end
      -- `lease` and `entry` stay: every lease check also wants state running, and an entry is
      -- only looked at while the job is queued.
      if keep and lock_ms > 1000 * tonumber(retention) then
        -- The lock outlasts the retention: the hash stays until the lock expires, in a
        -- member of its own.
        redis.call('ZADD', KEYS[6], string.format('%d', now + lock_ms), id)
      elseif keep then
        kept[#kept + 1] = id
      else
        redis.call('PEXPIRE', jk, lock_ms)
      end
    else
      gone[#gone + 1] = jk
    end
  end
end
del_keys(gone)
-- A stream id as two numbers (ms, seq).
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
if #kept > 0 then
  redis.call('ZADD', KEYS[6], string.format('%d', now + 1000 * tonumber(retention)), table.concat(kept, ' '))
end
for p = 1, 4 do
  local e = entries[tostring(p)]
  if #e > 0 then
    redis.call('XACK', KEYS[p], ARGV[1], unpack(e))
    -- The group delivers in id order and every delivered entry stays pending until acked, so
    -- every entry older than the oldest pending one (or, with none pending, up to the newest of
    -- this call) is acked: one exact XTRIM MINID deletes those, node by node, where an XDEL
    -- seeks each id from the start of its node (about ten times the cost). Entries of this call
    -- newer than an older pending one are XDELed. The caller names the newest entry of the call
    -- on each stream, so that the usual case (every entry of the call older than the oldest
    -- pending one) parses two ids, not each entry's.
    local first = redis.call('XPENDING', KEYS[p], ARGV[1], '-', '+', 1)
    local nms, nseq = id_parts(ARGV[4 + p])
    if not first[1] then
      redis.call('XTRIM', KEYS[p], 'MINID', string.format('%d-%d', nms, nseq + 1))
    else
      redis.call('XTRIM', KEYS[p], 'MINID', first[1][1])
      local fms, fseq = id_parts(first[1][1])
      if nms > fms or (nms == fms and nseq >= fseq) then
        local rest = {}
        for _, entry in ipairs(e) do
          local ms, seq = id_parts(entry)
          if ms > fms or (ms == fms and seq >= fseq) then rest[#rest + 1] = entry end
        end
        if #rest > 0 then redis.call('XDEL', KEYS[p], unpack(rest)) end
      end
    end
  end
end
if n > 0 then
  local batch = ARGV[4]
  if n == 1 or n < #out then
    local all, done = cjson.decode(batch), {}
    for k = 1, #out do
      if out[k] == 1 then
        for f = 6 * k - 5, 6 * k do done[#done + 1] = all[f] end
      end
    end
    if n == 1 then
      redis.call('XADD', KEYS[5], '*', 'id', done[1], 'run', done[2], 'attempt', done[3], 'outcome', 'succeeded',
        'type', done[4], 'started_at', done[5], 'finished_at', now_s, 'worker', done[6])
    else
      batch = cjson.encode(done)
    end
  end
  if n > 1 then
    redis.call('XADD', KEYS[5], '*', 'outcome', 'succeeded', 'finished_at', now_s, 'batch', batch)
  end
  redis.call('HINCRBY', string.sub(KEYS[5], 1, -7) .. 'stats', 'succeeded', n)
end
return out
