#!/usr/bin/env bash
# Paired rounds of the BullMQ baseline and one jobq drain, back to back, against the same Redis:
# each round runs BullMQ, then jobq, then (from the second round on the order flips) jobq, then
# BullMQ, so that a machine whose speed drifts over minutes weighs on both alike. Prints each
# pair's ratio and the median, minimum and maximum of the ratios.
#
# Usage: bench/pairs.sh [ROUNDS] [N]            (defaults 5 and 200000)
#   CONC=50      concurrency of both (BullMQ's worker and each jobq worker process)
#   WORKERS=1    worker processes of each (above 1, BullMQ runs bench/bullmq-wait.js, which
#                forks its workers)
#   BIN=dir      jobq binaries (default target/release, built first)
#   JOB_MS=n     jobs that wait n ms in their handler: bench/bullmq-wait.js against
#                `jobq bench --job-ms n` (default 0: no-op jobs, the baseline's bench.js)
#   JOBQ_*       settings passed on to the jobq processes, e.g. JOBQ_RETENTION_SUCCEEDED=0
# Needs node/npm for the baseline (../shared/bench/bullmq, or BULLMQ_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
N=${2:-200000}
CONC=${CONC:-50}
WORKERS=${WORKERS:-1}
source bench/setup.sh
JOB_MS=${JOB_MS:-0}
bullmq() {
  if [ "$JOB_MS" = 0 ] && [ "$WORKERS" = 1 ]; then
    script="$BULLMQ/bench.js"
  else
    script=bench/bullmq-wait.js
  fi
  BULLMQ_DIR=$BULLMQ N=$N CONC=$CONC JOB_MS=$JOB_MS WORKERS=$WORKERS node "$script" | grep '^{' |
    python3 -c 'import json, sys; print("bullmq", json.load(sys.stdin)["process_jobs_per_s"])' | tee -a "$out"
}
jobq() {
  "$BIN/jobq" bench -n "$N" --scenario drain --workers "$WORKERS" --concurrency "$CONC" --job-ms "$JOB_MS" 2>/dev/null |
    grep '^{' |
    python3 -c 'import json, sys; r = json.load(sys.stdin); print("jobq", r["recorded_jobs_per_s"])' | tee -a "$out"
}
for round in $(seq "$ROUNDS"); do
  echo "round $round"
  if [ $((round % 2)) = 1 ]; then bullmq; jobq; else jobq; bullmq; fi
done
python3 - "$out" "$ROUNDS" <<'PY'
import statistics, sys
lines = [l.split() for l in open(sys.argv[1]) if l.strip()]
rounds = int(sys.argv[2])
ratios = []
for r in range(rounds):
    pair = dict((k, float(v)) for k, v in lines[2 * r:2 * r + 2])
    ratios.append(pair["jobq"] / pair["bullmq"])
    print(f"round {r + 1}: BullMQ {pair['bullmq']:.0f} jobs/s, jobq {pair['jobq']:.0f} jobs/s (every attempt recorded), ratio {ratios[-1]:.2f}")
print(f"ratio: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f} over {rounds} pairs")
PY
