#!/usr/bin/env bash
# Scaling experiments: PS sync, PS async and allreduce on simulated devices in an
# emulated cluster (network namespaces, shaped links), each point against the cost
# model; OUT/scaling.csv, OUT/scaling.md and plots (speedup.png,
# measured-vs-model.png, split.png).
#
#   scripts/experiments/scaling.sh [--plan full|quick|claims|overlap|phase] [--out DIR]
#                                  [--only SUBSTR] [--steps K] [--cpu-bound F]
#
# Needs root (ip netns); exits 77 without it. Builds the release tree (build/) when
# pstrain is missing, installs python3-matplotlib when no python3 can import it
# (the plots are skipped, not the runs, when that fails), then runs scaling.py
# (--help: every option and what the points are). --plan full: 46 points, about
# 15-25 minutes on 2 cores; quick: 3 points, under a minute.
set -euo pipefail
. "$(dirname "$0")/common.sh"
exp_setup scaling
exec "$py" "$root/scripts/experiments/scaling.py" --bin-dir "$root/build/bin" "$@"
