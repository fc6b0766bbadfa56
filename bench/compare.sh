#!/usr/bin/env bash
# Runs the BullMQ baseline and jobq's benchmarks against the same Redis in one run, and prints
# the ratios. Usage: bench/compare.sh [N] (default 100000). Needs node/npm for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
BULLMQ=${BULLMQ_DIR:-../shared/bench/bullmq}
[ -d "$BULLMQ/node_modules/bullmq" ] || npm install --prefix "$BULLMQ" >/dev/null
cargo build --release --bins --quiet
out=$(mktemp -d)
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(redis-server --version | awk '{print $3}')"
N=$N CONC=50 node "$BULLMQ/bench.js" | tee "$out/bullmq.json"
./target/release/jobq bench -n "$N" --scenario enqueue-api | grep '^{' | tee "$out/jobq.json"
./target/release/jobq bench -n "$N" --scenario drain --workers 1 | grep '^{' | tee -a "$out/jobq.json"
./target/release/jobq bench -n "$N" --scenario drain --workers 2 | grep '^{' | tee -a "$out/jobq.json"
# As the baseline does (removeOnComplete): succeeded jobs leave Redis at completion (history stays).
JOBQ_RETENTION_SUCCEEDED=0 ./target/release/jobq bench -n "$N" --scenario drain --workers 1 | grep '^{' | tee -a "$out/jobq.json"
JOBQ_RETENTION_SUCCEEDED=0 ./target/release/jobq bench -n "$N" --scenario drain --workers 2 | grep '^{' | tee -a "$out/jobq.json"
./target/release/jobq bench --scenario latency | grep '^{' | tee -a "$out/jobq.json"
python3 - "$out" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
b = json.loads((d / "bullmq.json").read_text().strip().splitlines()[-1])
j = [json.loads(l) for l in (d / "jobq.json").read_text().splitlines() if l.strip()]
api = next(r for r in j if r["scenario"] == "enqueue-api")
drains = [r for r in j if r["scenario"] == "drain"]
lat = next(r for r in j if r["scenario"] == "latency")
print()
print(f"{'measure':<62} {'BullMQ':>10} {'jobq':>10} {'ratio':>7}")
print(f"{'bulk enqueue jobs/s (addBulk vs POST /jobs/batch)':<62} {b['enqueue_bulk_jobs_per_s']:>10} {api['jobs_per_s']:>10.0f} {api['jobs_per_s']/b['enqueue_bulk_jobs_per_s']:>7.2f}")
for r in drains:
    w = r["workers"]
    kept = "" if r.get("retention_succeeded_s", 1) else ", removed on success"
    print(f"{f'processing jobs/s ({w} worker process(es){kept})':<62} {b['process_jobs_per_s']:>10} {r['jobs_per_s']:>10.0f} {r['jobs_per_s']/b['process_jobs_per_s']:>7.2f}")
    print(f"{f'  ... with every attempt recorded in Postgres':<62} {'-':>10} {r['recorded_jobs_per_s']:>10.0f} {r['recorded_jobs_per_s']/b['process_jobs_per_s']:>7.2f}")
print(f"{'enqueue -> start p99 ms (idle worker)':<62} {b['latency_ms_p99']:>10} {lat['start_ms_p99']:>10} {'':>7}")
PY
