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
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ ! -x "$root/build/bin/pstrain" ] || [ ! -x "$root/build/bin/psserver" ]; then
  echo "compare: building the release tree (build/)" >&2
  "$root/scripts/build.sh" build -DCMAKE_BUILD_TYPE=Release
fi
# python3-matplotlib is for Debian's interpreter (/usr/bin/python3), which need
# not be the python3 on the PATH (pyenv, a virtualenv): use one that has it.
py=python3
with_matplotlib() {
  local c
  for c in python3 /usr/bin/python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import matplotlib' 2>/dev/null; then
      py=$c
      return 0
    fi
  done
  return 1
}
if ! with_matplotlib; then
  echo "compare: matplotlib missing; installing python3-matplotlib" >&2
  if ! { "$root/scripts/install-deps.sh" python3-matplotlib && with_matplotlib; }; then
    echo "compare: no python3 with matplotlib; the plot will be skipped" >&2
  fi
fi
exec "$py" "$root/scripts/experiments/compare.py" --bin-dir "$root/build/bin" "$@"
