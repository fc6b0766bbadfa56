# Sourced by bench/pairs.sh and bench/scale.sh: the BullMQ install (BULLMQ_DIR, default
# ../shared/bench/bullmq, installed with npm if missing), the jobq binaries (BIN, default
# target/release, built first) and a scratch file for the results ($out, removed on exit).
BULLMQ=${BULLMQ_DIR:-../shared/bench/bullmq}
[ -d "$BULLMQ/node_modules/bullmq" ] || npm install --prefix "$BULLMQ" >/dev/null
if [ -z "${BIN:-}" ]; then
  cargo build --release --bins --quiet
  BIN=target/release
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
