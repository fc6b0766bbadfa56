#!/usr/bin/env bash
# What the four calls a drained job makes on its hash cost Redis, for two layouts: the job hash
# as the enqueue script writes it (envelope inside, so a hash table), and the envelope in a
# string key of its own (the rest of the hash stays a listpack). Fills JOBS jobs, then runs the
# fetch's HMGET + HSET and the completion's HMGET + HSET (and, apart, the GET of the envelope)
# in a Lua loop over 100,000 of them in enqueue order, and prints µs per job and Redis memory.
#
# Usage: bench/hash-layout.sh [ROUNDS] (default 2; the layouts alternate)
#   JOBS=1000000  jobs filled per round
# Runs against a private redis-server on a free port (no persistence), stopped at the end.
set -euo pipefail
ROUNDS=${1:-2}
JOBS=${JOBS:-1000000}
source "$(dirname "$0")/private-redis.sh"
start_private_redis

cat >"$dir/fill.lua" <<'EOF'
-- ARGV: layout (inside | apart), first, last
local env = string.rep('x', 300)
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local id = string.format('01a235a4-2a79-76d0-9bff-%012d', i)
  local f = {'prio', 'normal', 'type', 'noop', 'max_attempts', '10', 'run', '1', 'run_at', '1764662400000',
    'enqueued_at', '1764662400000', 'state', 'queued', 'entry', '1764662400000-' .. i}
  if ARGV[1] == 'inside' then
    redis.call('HSET', 'job:' .. id, 'envelope', env, unpack(f))
  else
    redis.call('HSET', 'job:' .. id, unpack(f))
    redis.call('SET', 'env:' .. id, env)
  end
end
return 1
EOF
cat >"$dir/run.lua" <<'EOF'
-- ARGV: layout, first, last. Returns the loop's µs.
local t0 = redis.call('TIME')
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local id = string.format('01a235a4-2a79-76d0-9bff-%012d', i)
  local jk = 'job:' .. id
  if ARGV[1] == 'inside' then
    redis.call('HMGET', jk, 'state', 'entry', 'expires_at', 'attempt', 'lease_seq', 'attempts_total', 'run', 'envelope',
      'checkpoint')
  else
    redis.call('HMGET', jk, 'state', 'entry', 'expires_at', 'attempt', 'lease_seq', 'attempts_total', 'run', 'checkpoint')
    redis.call('GET', 'env:' .. id)
  end
  redis.call('HSET', jk, 'state', 'running', 'started_at', '1764662400123', 'lease', '1', 'worker', 'vm-11570-437573',
    'attempt', '1', 'lease_seq', '1', 'attempts_total', '1')
  redis.call('HMGET', jk, 'state', 'lease', 'unique_key', 'unique_hold', 'dep_mode', 'has_dependents')
  redis.call('HSET', jk, 'state', 'succeeded', 'finished_at', '1764662400456')
end
local t1 = redis.call('TIME')
return (tonumber(t1[1]) - tonumber(t0[1])) * 1000000 + tonumber(t1[2]) - tonumber(t0[2])
EOF

for _ in $(seq "$ROUNDS"); do
  for layout in inside apart; do
    $R flushall >/dev/null
    for ((first = 1; first <= JOBS; first += 100000)); do
      $R --eval "$dir/fill.lua" , "$layout" "$first" "$((first + 99999 < JOBS ? first + 99999 : JOBS))" >/dev/null
    done
    mem=$($R info memory | awk -F: '/^used_memory_human/ {print $2}' | tr -d '\r')
    # 4 × 25,000 jobs from the middle of the keyspace, each call short of the script time limit.
    total=0
    for k in 0 1 2 3; do
      first=$((JOBS / 5 + k * JOBS / 10 + 1))
      total=$((total + $($R --eval "$dir/run.lua" , "$layout" "$first" "$((first + 24999))")))
    done
    echo "envelope $layout: $(python3 -c "print(round($total / 100000, 2))") µs per job, Redis used $mem"
  done
done
