#!/usr/bin/env bash
# Compares builds on the drain: runs bench/cpu-per-job.sh for each build in turn, ROUNDS times
# (so that a slow minute of the machine hits every build alike), then prints the median and the
# range of jobs/s and of the CPU µs per job of each process.
#
# Usage: bench/ab.sh ROUNDS N DIR...    e.g. bench/ab.sh 4 100000 /tmp/before target/release
#   each DIR holds jobq, jobq-worker and jobq-scheduler (copy target/release/ aside per build)
#   CONC and WORKERS pass through to bench/cpu-per-job.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: $0 ROUNDS N DIR..." >&2; exit 2; }
rounds=$1 n=$2
shift 2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$rounds"); do
  for dir in "$@"; do
    # The whole output first: `head` closing the pipe early would fail the run with SIGPIPE.
    full=$(BIN=$dir bash bench/cpu-per-job.sh "$n" 1 2>/dev/null) || { echo "$dir: run failed" >&2; continue; }
    line=$(printf '%s\n' "$full" | sed -n '1,2p' | tr '\n' ' ')
    echo "$dir $line" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import collections, re, statistics, sys
runs = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    build = line.split()[0]
    runs[build]["jobs/s"].append(float(re.search(r"([\d.]+) jobs/s", line).group(1)))
    for k in ["redis", "worker", "scheduler", "postgres", "total"]:
        runs[build][k].append(float(re.search(k + r" ([\d.]+)", line).group(1)))
print()
for build, figures in runs.items():
    print(build)
    for k, v in figures.items():
        print(f"  {k:<10} median {statistics.median(v):>9.1f}   [{min(v):.1f} - {max(v):.1f}]")
PY
