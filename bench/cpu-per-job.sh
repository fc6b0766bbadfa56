#!/usr/bin/env bash
# CPU time per job of a drain, per process: Redis, the worker, the scheduler (recorder), the
# Postgres backends of the bench database and Postgres' background processes. On a machine
# where every process shares the cores, this (not wall-clock jobs/s) is what bounds throughput:
# jobs/s ≤ cores / total CPU per job.
#
# Usage: bench/cpu-per-job.sh [N] [RUNS]            (defaults 100000 and 2)
#   BIN=dir        binaries to run (jobq, jobq-worker, jobq-scheduler side by side);
#                  default target/release, built first
#   CONC=50        worker concurrency;  WORKERS=1  worker processes
#   LOG_LEVEL=warn log level of the worker and scheduler (info: the binaries' default)
#   REDIS_URL=...  use that Redis instead of a private one
#   REDIS_ARGS=... extra arguments for the private redis-server (e.g. "--hash-max-listpack-value 1024")
#
# By default a private redis-server (no persistence, noeviction) is started on a free port for
# the run, so other users of the machine's Redis do not count against the figures. Postgres is
# the configured one (DATABASE_URL); only the bench database's backends are counted as
# "postgres", and "postgres_aux" (WAL writer, checkpointer, autovacuum...) is shared with
# whatever else runs on that server. The accounting itself is in `jobq bench --scenario drain`
# (crates/jobq-cli/src/bench.rs): it starts after the prefill and ends when every attempt is
# in job_executions.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
RUNS=${2:-2}
CONC=${CONC:-50}
WORKERS=${WORKERS:-1}
LOG_LEVEL=${LOG_LEVEL:-warn}
if [ -z "${BIN:-}" ]; then
  cargo build --release --bins --quiet
  BIN=target/release
fi
if [ -z "${REDIS_URL:-}" ]; then
  source bench/private-redis.sh
  # shellcheck disable=SC2086 # REDIS_ARGS is a list of arguments
  start_private_redis ${REDIS_ARGS:-}
  export REDIS_URL="redis://127.0.0.1:$PORT"
fi
for run in $(seq "$RUNS"); do
  line=$("$BIN/jobq" bench -n "$N" --scenario drain --workers "$WORKERS" --concurrency "$CONC" --log-level "$LOG_LEVEL" | grep '^{')
  python3 - "$run" "$line" <<'PY'
import json, sys
run, r = sys.argv[1], json.loads(sys.argv[2])
c = r["cpu_us_per_job"]
print(f"run {run}: {r['jobs_per_s']:.0f} jobs/s, recorded {r['recorded_jobs_per_s']:.0f} jobs/s, "
      f"CPU-bound ceiling {r['cpu_bound_jobs_per_s']:.0f} jobs/s")
print("  CPU µs/job: " + "  ".join(f"{k} {v:.1f}" for k, v in c.items()))
print("  Redis commands (calls/job, µs/job; scripts include the commands they run):")
for name, s in r["redis_commands"].items():
    print(f"    {name:<14} {s['calls_per_job']:>6.2f} {s['us_per_job']:>7.1f}")
PY
done
