#!/usr/bin/env bash
# Times POST /api/v1/jobs/batch of 1,000 jobs with unique keys: once (every job created), then
# RESENDS times the same body (every job a duplicate, answered with the existing job), as a
# client retrying a batch after a timeout does. Usage: bench/batch-resend.sh [RESENDS] (default 5).
# Runs target/release/jobq-api (BIN=dir for another build) in a namespace and database of its
# own, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
RESENDS=${1:-5}
BIN=${BIN:-target/release}
[ -x "$BIN/jobq-api" ] || cargo build --release --bin jobq-api --quiet
NS=batchresend$$
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
body=$(mktemp)
python3 -c '
import json
print(json.dumps({"jobs": [{"type": "x", "payload": {"n": i}, "unique_key": "k-%d" % i} for i in range(1000)]}))' >"$body"
psql -h 127.0.0.1 -U postgres -qc "create database $NS"
JOBQ_NAMESPACE=$NS JOBQ_AUTH=off JOBQ_API_ADDR=127.0.0.1:$PORT JOBQ_DATABASE_URL=postgres://postgres@127.0.0.1/$NS \
  RUST_LOG=warn "$BIN/jobq-api" >/dev/null 2>&1 &
api=$!
cleanup() {
  kill "$api" 2>/dev/null || true
  wait "$api" 2>/dev/null || true
  redis-cli --scan --pattern "$NS:*" | xargs -r redis-cli unlink >/dev/null
  psql -h 127.0.0.1 -U postgres -qc "drop database if exists $NS"
  rm -f "$body"
}
trap cleanup EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break; sleep 0.1; done
post() {
  curl -s -o /dev/null -w '%{http_code} %{time_total}' -H 'content-type: application/json' --data-binary @"$body" \
    "http://127.0.0.1:$PORT/api/v1/jobs/batch"
}
echo "first (1,000 created): $(post) s"
for i in $(seq "$RESENDS"); do echo "resend $i (1,000 existing): $(post) s"; done
