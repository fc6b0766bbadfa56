# Sourced by the bench scripts: `start_private_redis [redis-server args...]` starts a
# redis-server of their own on a free port (no persistence, noeviction, data in a temporary
# directory), waits until it answers and stops it when the script exits. Sets PORT, dir (the
# temporary directory, removed at exit) and R (a redis-cli command for it).
start_private_redis() {
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  dir=$(mktemp -d)
  redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --maxmemory-policy noeviction \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@"
  trap 'kill "$(cat "$dir/redis.pid")" 2>/dev/null; rm -rf "$dir"' EXIT
  R="redis-cli -p $PORT"
  for _ in $(seq 50); do $R ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "the private redis-server on port $PORT does not answer (log: $dir/redis.log)" >&2
  return 1
}
