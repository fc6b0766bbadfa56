#!/usr/bin/env bash
# Runs schemathesis (pinned) from its own virtualenv, creating the venv on first use.
#
#   chaos/schemathesis.sh [schemathesis arguments...]
#
# The venv lives in <target dir>/schemathesis-venv (CARGO_TARGET_DIR, else target/ beside this
# repository's Cargo.toml), so `cargo clean` removes it and nothing is installed system-wide.
set -euo pipefail

version=4.32.5
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CARGO_TARGET_DIR:-$root/target}/schemathesis-venv"

installed() {
    [ -x "$venv/bin/schemathesis" ] && [ "$("$venv/bin/schemathesis" --version 2>/dev/null | grep -o '[0-9.]*$')" = "$version" ]
}

if ! installed; then
    # One installer at a time when several tests start together.
    mkdir -p "$(dirname "$venv")"
    exec 9>"$venv.lock"
    flock 9
    if ! installed; then
        rm -rf "$venv"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version" >&2
    fi
    flock -u 9
fi

exec "$venv/bin/schemathesis" "$@"
