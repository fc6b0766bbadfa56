#!/usr/bin/env bash
# Runs the BullMQ baseline and jobq's benchmarks against the same Redis in one run, and prints
# the ratios. Usage: bench/compare.sh [N] (default 100000). Needs node/npm for the baseline.
# PAIRS=K (default 4) then runs bench/pairs.sh: K back-to-back pairs of the baseline and the
# 1 worker x 50 drain, and their median ratio, which the machine's drift moves less (0: skip).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
BULLMQ=${BULLMQ_DIR:-../shared/bench/bullmq}
[ -d "$BULLMQ/node_modules/bullmq" ] || npm install --prefix "$BULLMQ" >/dev/null
cargo build --release --bins --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(redis-server --version | awk '{print $3}')"
# The machine's speed drifts over minutes, so the baseline runs right before and right after
# each block of jobq runs at its concurrency, and the ratios are against the mean of the two.
bullmq() { N=$N CONC=$1 node "$BULLMQ/bench.js" | tee -a "$out/bullmq.json"; }
jobq() { ./target/release/jobq bench -n "$N" "$@" | grep '^{' | tee -a "$out/jobq.json"; }
for c in 50 200; do
  bullmq $c
  # 50 concurrent clients, and one (as the baseline's one addBulk loop, each batch awaited).
  if [ "$c" = 50 ]; then jobq --scenario enqueue-api; jobq --scenario enqueue-api --concurrency 1; fi
  jobq --scenario drain --workers 1 --concurrency $c
  jobq --scenario drain --workers 2 --concurrency $c
  # As the baseline does (removeOnComplete): succeeded jobs leave Redis at completion; their
  # attempts are still recorded in Postgres.
  JOBQ_RETENTION_SUCCEEDED=0 jobq --scenario drain --workers 1 --concurrency $c
  JOBQ_RETENTION_SUCCEEDED=0 jobq --scenario drain --workers 2 --concurrency $c
  # One runtime thread per worker process (JOBQ_WORKER_THREADS=1), as the baseline's one
  # Node.js thread: for handlers that wait rather than compute (docs/operations.md).
  JOBQ_WORKER_THREADS=1 jobq --scenario drain --workers 1 --concurrency $c
  JOBQ_WORKER_THREADS=1 JOBQ_RETENTION_SUCCEEDED=0 jobq --scenario drain --workers 1 --concurrency $c
  if [ "$c" = 50 ]; then jobq --scenario latency; fi
  bullmq $c
done
# CPU per job of BullMQ's drain alone (bench/bullmq-wait.js: Redis and the worker process during
# the drain, no enqueue in between), beside jobq's 1 x 50 drain's.
BULLMQ_DIR=$BULLMQ N=$N CONC=50 JOB_MS=0 WORKERS=1 node bench/bullmq-wait.js | grep '^{' | tee "$out/bullmq-cpu.json"
python3 - "$out" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
runs = {}
for l in (d / "bullmq.json").read_text().splitlines():
    if l.startswith("{"):
        b = json.loads(l)
        runs.setdefault(b["concurrency"], []).append(b)
mean = lambda rs, k: sum(float(r[k]) for r in rs) / len(rs)
bull = {c: {k: mean(rs, k) for k in ("enqueue_bulk_jobs_per_s", "process_jobs_per_s", "latency_ms_p50", "latency_ms_p99")}
        for c, rs in runs.items()}
for c, rs in sorted(runs.items()):
    print(f"BullMQ, concurrency {c}, before and after jobq's runs: processing "
          + " / ".join(f"{r['process_jobs_per_s']:.0f}" for r in rs) + " jobs/s, bulk enqueue "
          + " / ".join(f"{r['enqueue_bulk_jobs_per_s']:.0f}" for r in rs) + " jobs/s (the ratios use the mean)")
b = bull[50]
j = [json.loads(l) for l in (d / "jobq.json").read_text().splitlines() if l.strip()]
apis = [r for r in j if r["scenario"] == "enqueue-api"]
drains = [r for r in j if r["scenario"] == "drain"]
lat = next(r for r in j if r["scenario"] == "latency")
row = lambda label, theirs, ours: print(f"{label:<100} {theirs:>10.0f} {ours:>10.0f} {ours / theirs:>7.2f}")
print()
print(f"{'measure (BullMQ: 1 worker process, same concurrency)':<100} {'BullMQ':>10} {'jobq':>10} {'ratio':>7}")
for api in apis:
    clients = api.get("clients", 50)
    who = "one client, as the baseline's one addBulk loop" if clients == 1 else f"{clients} concurrent clients"
    row(f"bulk enqueue jobs/s (addBulk vs POST /jobs/batch, {who})", b["enqueue_bulk_jobs_per_s"], api["jobs_per_s"])
for r in drains:
    w, c = r["workers"], r["concurrency"]
    kept = "" if r.get("retention_succeeded_s", 1) else ", removed on success"
    t = r.get("worker_threads", 0)
    if t:
        kept += f", {t} runtime thread{'s' if t > 1 else ''}"
    theirs = bull[c]["process_jobs_per_s"]
    row(f"processing jobs/s, concurrency {c}, {w} worker process(es){kept}", theirs, r["jobs_per_s"])
    row("  ... with every attempt recorded in Postgres", theirs, r["recorded_jobs_per_s"])
for p in ("p50", "p99"):
    print(f"{f'enqueue -> start {p} ms (one job at a time, idle worker)':<100} {b['latency_ms_' + p]:>10.2f} {lat['start_ms_' + p]:>10} {'':>7}")
# CPU per job: lower is better, so the ratio is BullMQ's over jobq's.
cpu = json.loads((d / "bullmq-cpu.json").read_text())["cpu_us_per_job"]
ours = next(r for r in drains if r["workers"] == 1 and r["concurrency"] == 50 and r.get("retention_succeeded_s", 1)
            and not r.get("worker_threads", 0))["cpu_us_per_job"]
print()
print(f"{'CPU µs per job, drain at 1 x 50 (BullMQ: bench/bullmq-wait.js; ratio: BullMQ / jobq)':<100} {'BullMQ':>10} {'jobq':>10} {'ratio':>7}")
for label, theirs, mine in (("Redis", cpu["redis"], ours["redis"]), ("worker process", cpu["worker"], ours["worker"]),
                            ("all processes (jobq: also Postgres and the scheduler's recorder)", cpu["redis"] + cpu["worker"], ours["total"])):
    print(f"{label:<100} {theirs:>10.1f} {mine:>10.1f} {theirs / mine:>7.2f}")
PY
if [ "${PAIRS:-4}" -gt 0 ]; then
  echo
  echo "1 worker x 50, back-to-back pairs (bench/pairs.sh ${PAIRS:-4} $N):"
  BIN=target/release bash bench/pairs.sh "${PAIRS:-4}" "$N" | grep -v '^\(round [0-9]*\|bullmq\|jobq\) *[0-9.]*$'
fi
