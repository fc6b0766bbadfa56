#!/usr/bin/env bash
# Instructions Redis executes per job in the two scripts of a drain's hot path, the fetch script
# and complete_many, counted by valgrind's callgrind. Unlike µs, the count is the same from run
# to run for the same scripts and the same redis-server, whatever else the machine is doing, so
# a change to a script shows even where the machine's speed drifts by more than the change.
#
# A private redis-server runs under callgrind (about 50 times slower than natively). The bench
# fills 10,000 queued jobs (bench/fill-jobs.lua), fetches JOBS of them COUNT at a time as one
# worker × 50 does, then completes each fetched batch with one complete_many call, oldest batch
# first (so the usual case: later batches still pending). Each phase is counted on its own.
#
# Usage: bench/script-instructions.sh [FETCH] [COMPLETE]
#   FETCH, COMPLETE  variants of crates/jobq-core/src/stream/lua/fetch.lua and complete_many.lua
#                    (default: those files); lib.lua is prepended, as the broker does
#   JOBS=5000 jobs fetched and completed (at most 9,975);  COUNT=25 jobs per call
#   LENIENT=1    go on when complete_many answers stale (a fetch variant that writes no lease)
# Needs valgrind (callgrind_control) and python3; no Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
LUA=crates/jobq-core/src/stream/lua
FETCH=${1:-$LUA/fetch.lua}
COMPLETE=${2:-$LUA/complete_many.lua}
command -v callgrind_control >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out.%p" \
  redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >"$dir/valgrind.log" 2>&1 &
vg=$!
trap 'kill "$vg" 2>/dev/null; wait "$vg" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 150); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.2; done

python3 - "$PORT" "$vg" "$dir" "$LUA/lib.lua" "$FETCH" "$COMPLETE" "${JOBS:-5000}" "${COUNT:-25}" "${LENIENT:-0}" <<'PY'
import glob, json, socket, subprocess, sys

port, pid, out, lib, fetch_path, complete_path = sys.argv[1:7]
jobs, count = int(sys.argv[7]), int(sys.argv[8])
lenient, warned = sys.argv[9] == "1", []
calls = jobs // count
sock = socket.create_connection(("127.0.0.1", int(port)))
buf = sock.makefile("rb")

def cmd(*args):
    """One command over RESP; returns its reply (bytes, int, list or None)."""
    parts = [str(a).encode() if not isinstance(a, bytes) else a for a in args]
    sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
    return read()

def read():
    line = buf.readline()[:-2]
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest
    if kind == b"-":
        sys.exit(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else buf.read(n + 2)[:-2]
    n = int(rest)
    return None if n < 0 else [read() for _ in range(n)]

def counted():
    """Instructions since the previous dump (each callgrind dump holds the costs since the last)."""
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    last = max(glob.glob(f"{out}/callgrind.out.*.*"), key=lambda f: int(f.rsplit(".", 1)[1]))
    return next(int(l.split()[1]) for l in open(last) if l.startswith(("summary:", "totals:")))

q = "b:{q:default}:"
streams = [f"{q}stream:{p}" for p in ("critical", "high", "normal", "low")]
for s in streams:
    cmd("XGROUP", "CREATE", s, "jobq-workers", "$", "MKSTREAM")
cmd("EVAL", open("bench/fill-jobs.lua").read(), 1, streams[2], q + "job:", 1, 10000)
prelude = open(lib).read() + "\n"
fetch = cmd("SCRIPT", "LOAD", prelude + open(fetch_path).read())
complete = cmd("SCRIPT", "LOAD", prelude + open(complete_path).read())

def fetch_batch():
    reply = cmd("EVALSHA", fetch, 6, *streams, q + "events", q + "paused", "jobq-workers", "bench-0", count,
                q + "job:", 86400)
    # Per job: head (id entry priority attempt lease run total), envelope, checkpoint.
    flat, now = reply[0], reply[3]
    return [head.split(b" ") for head in flat[0::3]], now.decode()

def stream_id(entry):
    ms, seq = entry.decode().split("-")
    return int(ms), int(seq)

def complete_batch(batch, now):
    # As Broker::settle builds the call: the outbox batch, the newest entry per stream, then
    # five arguments per job (priority index, id, lease, entry, result).
    event = []
    for j in batch:
        event += [j[0].decode(), str(j[5]), str(j[3]), "noop", now, "bench-0"]
    newest = [""] * 4
    for j in batch:
        p = int(j[2]) - 1
        if newest[p] == "" or stream_id(j[1]) > stream_id(newest[p].encode()):
            newest[p] = j[1].decode()
    args = ["jobq-workers", 86400, q + "job:", json.dumps(event), *newest]
    for j in batch:
        args += [j[2], j[0], j[4], j[1], ""]
    codes = cmd("EVALSHA", complete, 6, *streams, q + "events", q + "retained", *args)
    if codes != [1] * len(batch):
        # A fetch variant that leaves the hash unlike the real one (no lease written, say) gets
        # stale answers: its own count still holds, complete_many's is not the real path's.
        if not lenient:
            sys.exit(f"complete_many answered {codes} (LENIENT=1 counts on)")
        warned.append(codes)

# One call of each first, so that neither phase counts compiling a script.
complete_batch(*fetch_batch())
counted()
batches = [fetch_batch() for _ in range(calls)]
fetched = counted()
for b in batches:
    complete_batch(*b)
completed = counted()
n = calls * count
print(f"Redis instructions per job ({n} jobs, {count} per call): fetch {fetched / n:,.0f}  "
      f"complete_many {completed / n:,.0f}  both {(fetched + completed) / n:,.0f}")
if warned:
    print(f"complete_many answered stale for the variant: its count is not the real path's")
# For scale: a PING, and the fetch's XREADGROUP sent on its own (not from a script), on what is
# left of the stream.
for _ in range(100):
    cmd("PING")
ping = counted() / 100
left = (10000 - n - count) // count
for _ in range(left):
    cmd("XREADGROUP", "GROUP", "jobq-workers", "bench-1", "COUNT", count, "STREAMS", streams[2], ">")
direct = counted() / (left * count)
print(f"for scale: PING {ping:,.0f} per command; XREADGROUP outside a script {direct:,.0f} per entry "
      f"({count} per call)")
PY
