-- Register CONSUMER's lease in the queue's leases hash (see reclaim.lua) until MS from now;
-- a registration of the same lease that already lasts longer is kept.
-- KEYS: 1 leases hash
-- ARGV: 1 consumer, 2 lease ms, 3 ms the registration holds without renewal
register_lease(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), now_ms())
return 1
