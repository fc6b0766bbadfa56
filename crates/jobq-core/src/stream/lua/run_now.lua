-- Run a scheduled or retrying job now: out of the scheduled set into its priority stream, as
-- the promoter moves it once its run_at has come (run_at becomes now). A job held back by a
-- limit or a circuit (held_by) goes too: its worker's layers decide again when it starts. A job
-- in any other state is left as it is.
-- KEYS: 1 job hash, 2 scheduled zset, 3..6 priority streams (critical, high, normal, low)
-- ARGV: 1 id
-- Returns {1, 'queued', the job hash as it is now (HGETALL)}, so that the caller answers with
-- the job even when a worker runs it and its hash goes before another read; or {0, state, {}}
-- (state '' when there is no such job).
local h = redis.call('HMGET', KEYS[1], 'state', 'prio')
local index = { critical = 3, high = 4, normal = 5, low = 6 }
if not h[1] then return {0, '', {}} end
if (h[1] ~= 'scheduled' and h[1] ~= 'retrying') or not index[h[2]] then return {0, h[1], {}} end
local _, now_s = now_ms_pair()
queue_now(KEYS[1], ARGV[1], KEYS[index[h[2]]], KEYS[2], now_s)
return {1, 'queued', redis.call('HGETALL', KEYS[1])}
