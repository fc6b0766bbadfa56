#!/usr/bin/env bash
# What the fetch script costs Redis per job, alone: fills 100,000 queued jobs (hash and stream
# entry, as the enqueue script writes them), then starts 10,000 of them with 400 calls of the
# script (25 jobs each, as one worker × 50 fetches; COUNT changes that) and prints, from
# Redis' commandstats, the script's µs per job and those of the commands it calls.
#
# Usage: bench/fetch-script.sh [SCRIPT] [ROUNDS]
#   SCRIPT  a variant of crates/jobq-core/src/stream/lua/fetch.lua (default: that file);
#           lib.lua is prepended, as the broker does
#   ROUNDS  runs, each on a freshly filled Redis (default 3)
#   COUNT=25  jobs per call (10,000 / COUNT calls)
# Runs against a private redis-server on a free port (no persistence), stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=${1:-crates/jobq-core/src/stream/lua/fetch.lua}
ROUNDS=${2:-3}
COUNT=${COUNT:-25}
source bench/private-redis.sh
start_private_redis

q='b:{q:default}:'
for _ in $(seq "$ROUNDS"); do
  $R flushall >/dev/null
  for p in critical high normal low; do $R xgroup create "${q}stream:$p" jobq-workers '$' mkstream >/dev/null; done
  for first in 1 50001; do $R --eval bench/fill-jobs.lua "${q}stream:normal" , "${q}job:" "$first" "$((first + 49999))" >/dev/null; done
  sha=$(cat crates/jobq-core/src/stream/lua/lib.lua "$SCRIPT" | $R -x script load)
  $R config resetstat >/dev/null
  for _ in $(seq $((10000 / COUNT))); do
    echo "EVALSHA $sha 6 ${q}stream:critical ${q}stream:high ${q}stream:normal ${q}stream:low ${q}events ${q}paused jobq-workers bench-0 $COUNT ${q}job: 86400"
  done | $R >/dev/null
  stats=$($R info commandstats | tr -d '\r')
  line="fetch script"
  for c in evalsha hmget hset xreadgroup; do
    usec=$(sed -n "s/^cmdstat_$c:calls=[0-9]*,usec=\([0-9]*\),.*/\1/p" <<<"$stats")
    line="$line  ${c/evalsha/in all} $(python3 -c "print(f'{${usec:-0} / 10000:.2f}')")"
  done
  echo "$line (µs per job)"
done
