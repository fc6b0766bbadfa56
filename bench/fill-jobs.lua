-- Fills queued jobs as the enqueue script leaves them (job hash and stream entry), for the
-- script benchmarks (bench/fetch-script.sh, bench/script-instructions.sh).
-- KEYS[1] the normal stream; ARGV: job key prefix, first, last
local env = '{"id":"01a235a7-8422-741d-baeb-5b61ab000000","type":"noop","queue":"default","priority":"normal",'
  .. '"payload":{"n":1},"max_attempts":10,"backoff":{"strategy":"exponential","jitter":"equal","base":"1s",'
  .. '"max":"1h"},"timeout":"30s","metadata":{},"created_at":"2026-12-02T07:28:20.532Z"}'
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local id = string.format('01a235a4-2a79-76d0-9bff-%012d', i)
  local e = redis.call('XADD', KEYS[1], '*', 'id', id)
  redis.call('HSET', ARGV[1] .. id, 'envelope', env, 'prio', 'normal', 'type', 'noop', 'max_attempts', '10', 'run', '1',
    'run_at', '1764662400000', 'enqueued_at', '1764662400000', 'plain', '1', 'state', 'queued', 'entry', e)
end
return 1
