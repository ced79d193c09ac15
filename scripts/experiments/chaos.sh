#!/bin/sh
# chaos.sh [N] [chaos.py options...]: N random kills over N runs (default 50) of
# a small training job in PS sync, PS async and allreduce modes; prints a table
# of outcomes, redone steps and time lost (scripts/experiments/chaos.py).
set -e
here=$(cd "$(dirname "$0")" && pwd)
n=50
case "$1" in [0-9]*) n=$1; shift ;; esac
exec python3 "$here/chaos.py" --runs "$n" --bin-dir "${BIN_DIR:-$here/../../build/bin}" "$@"
