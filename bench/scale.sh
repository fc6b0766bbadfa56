#!/usr/bin/env bash
# Does a second worker process add throughput? Drains with one and with two worker processes,
# for jobq (`jobq bench --scenario drain --workers W --job-ms MS`) and for BullMQ
# (bench/bullmq-wait.js, WORKERS=W), rounds in alternating order against the same Redis, for
# each job length. Prints, per job length, the median jobs/s of each, what the second process
# adds (2 ÷ 1), and jobq ÷ BullMQ at one and at two processes (medians of the rounds' ratios);
# then what a slot's turn takes beside its handler (the drains' slot_cycle_ms − handler_ms).
#
# Usage: bench/scale.sh [ROUNDS] [N]            (defaults 2 and 100000)
#   JOB_MS="0 1 10"  job lengths in ms (0: no-op jobs); a length above 0 runs at most the jobs
#                    two processes' slots finish in about 10 s
#   CONC=50          concurrency of each worker process
#   BIN=dir          jobq binaries (default target/release, built first)
#   JOBQ_*           settings passed on to the jobq processes
# Needs node/npm for BullMQ (../shared/bench/bullmq, or BULLMQ_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
N=${2:-100000}
CONC=${CONC:-50}
source bench/setup.sh
run() { # system workers job_ms jobs -> "job_ms system workers jobs/s slot_cycle_ms handler_ms"
  local r
  if [ "$1" = bullmq ]; then
    r=$(BULLMQ_DIR=$BULLMQ N=$4 CONC=$CONC JOB_MS=$3 WORKERS=$2 node bench/bullmq-wait.js | grep '^{' |
      python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["process_jobs_per_s"], r["slot_cycle_ms"], r["handler_ms"])')
  else
    r=$("$BIN/jobq" bench -n "$4" --scenario drain --workers "$2" --concurrency "$CONC" --job-ms "$3" 2>/dev/null |
      grep '^{' | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["recorded_jobs_per_s"], r["slot_cycle_ms"], r["handler_ms"] or 0)')
  fi
  echo "$3 $1 $2 $r" | tee -a "$out"
}
for ms in ${JOB_MS:-0 1 10}; do
  jobs=$N
  if [ "$ms" -gt 0 ]; then jobs=$((N < 20000 * CONC / ms ? N : 20000 * CONC / ms)); fi
  for round in $(seq "$ROUNDS"); do
    order="jobq:1 jobq:2 bullmq:1 bullmq:2"
    if [ $((round % 2)) = 0 ]; then order="bullmq:2 bullmq:1 jobq:2 jobq:1"; fi
    for o in $order; do run "${o%:*}" "${o#*:}" "$ms" "$jobs"; done
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
turn = collections.defaultdict(list)
for line in open(sys.argv[1]):
    ms, system, workers, rate, cycle, handler = line.split()
    runs[(int(ms), system, int(workers))].append(float(rate))
    turn[(int(ms), system, int(workers))].append(float(cycle) - float(handler))
med = statistics.median
print()
print(f"{'job ms':>6} {'jobq 1':>9} {'jobq 2':>9} {'2 / 1':>6} {'BullMQ 1':>9} {'BullMQ 2':>9} {'2 / 1':>6} {'ratio 1':>8} {'ratio 2':>8}")
for ms in sorted({k[0] for k in runs}):
    j1, j2, b1, b2 = (runs[(ms, s, w)] for s, w in (("jobq", 1), ("jobq", 2), ("bullmq", 1), ("bullmq", 2)))
    r1 = med(a / b for a, b in zip(j1, b1))
    r2 = med(a / b for a, b in zip(j2, b2))
    print(f"{ms:>6} {med(j1):>9.0f} {med(j2):>9.0f} {med(j2) / med(j1):>6.2f} {med(b1):>9.0f} {med(b2):>9.0f} "
          f"{med(b2) / med(b1):>6.2f} {r1:>8.2f} {r2:>8.2f}")
print("(jobs/s; jobq's with every attempt recorded; ratio = jobq / BullMQ, median of the rounds)")
print()
print("A slot's turn beside its handler, ms (slot_cycle_ms - handler_ms, medians; the handlers' own time")
print("includes the timers' slack: Tokio's and Node's both work in whole milliseconds):")
print(f"{'job ms':>6} {'jobq 1':>8} {'jobq 2':>8} {'BullMQ 1':>9} {'BullMQ 2':>9}")
for ms in sorted({k[0] for k in runs}):
    cells = [med(turn[(ms, s, w)]) for s, w in (("jobq", 1), ("jobq", 2), ("bullmq", 1), ("bullmq", 2))]
    print(f"{ms:>6} {cells[0]:>8.2f} {cells[1]:>8.2f} {cells[2]:>9.2f} {cells[3]:>9.2f}")
PY
