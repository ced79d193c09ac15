#!/usr/bin/env bash
# PS sync, PS async and allreduce over 1-4 workers: examples/s, time per step
# (compute / communication / update / data wait) and final accuracy, written
# as OUT/results.csv, OUT/results.md and OUT/results.png.
#
#   scripts/experiments/compare.sh [--workers 1,2,3,4] [--modes ps-sync,ps-async,allreduce]
#       [--ps N] [--epochs E] [--train-limit N] [--batch-size B] [--repeats R] [--out DIR] [--quick]
#
# Builds the release tree (build/) when pstrain is missing, installs
# python3-matplotlib when no python3 can import it (the plot is skipped, not
# the run, when that fails), then runs compare.py (--help: every option). Default:
# all 60000 images, 3 epochs, W = 1..4, all three modes, 3 repeats (about 4
# minutes on 2 cores); --quick: 12000 images, 1 epoch, 1 repeat (about 30 s).
# Exit status 1 when any run failed.
set -euo pipefail
. "$(dirname "$0")/common.sh"
exp_setup compare
exec "$py" "$root/scripts/experiments/compare.py" --bin-dir "$root/build/bin" "$@"
