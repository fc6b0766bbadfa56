-- Write fields of a running job for the attempt that holds its lease (progress, checkpoint):
-- a worker that lost the lease (a zombie) writes nothing.
-- KEYS: 1 job hash
-- ARGV: 1 lease token, then field, value pairs
-- Returns 1, or 0 when the lease is not the caller's.
local cur = redis.call('HMGET', KEYS[1], 'state', 'lease')
if cur[1] ~= 'running' or cur[2] ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
