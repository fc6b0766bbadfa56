-- A counting semaphore shared by every worker: take one of LIMIT slots for MEMBER, or renew it
-- when MEMBER holds one already. Slots expire TTL ms after their last renewal, so a slot of a
-- crashed worker frees itself.
-- KEYS: 1 slots zset (member -> expiry ms)
-- ARGV: 1 member, 2 limit, 3 ttl ms
-- Returns 1 when MEMBER holds a slot, 0 when every slot is taken.
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
  return 1
end
return 0
