#!/usr/bin/env bash
# Configure and build one build tree: scripts/build.sh DIR [cmake args...].
# Quiet on success; prints the compiler output when something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1; shift
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { cmake -S . -B "$dir" "$@" && cmake --build "$dir" -j "$(nproc)"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "build failed in $dir" >&2
  exit 1
fi
