#!/usr/bin/env bash
# The main job: install what is missing, build, and train the MLP on
# Fashion-MNIST on a local cluster (2 PS + 2 workers on 127.0.0.1 by
# default), printing progress and the final test accuracy.
#   ./scripts/run-local.sh [--mode ps|local|allreduce] [--ps N] [--workers N] [pstrain options...]
#   ./scripts/run-local.sh --model deepfm [...]   # DeepFM on click data in the Criteo format
#   ./scripts/run-local.sh --help
# With --model deepfm or lr and no --data-dir, the planted click data set is
# generated on first use (scripts/make-ctr-data, into a cache directory) and
# reused after.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh build -DCMAKE_BUILD_TYPE=Release
ctr=0 data=0
for a in "$@"; do
  case "$a" in
    deepfm|lr|--model=deepfm|--model=lr) ctr=1 ;;
    --data-dir|--data-dir=*) data=1 ;;
  esac
done
extra=()
if [ $ctr -eq 1 ] && [ $data -eq 0 ]; then
  dir=$(CTRGEN=build/bin/ctrgen ./scripts/make-ctr-data | tail -n 1)
  extra=(--data-dir "$dir")
fi
exec python3 scripts/launch.py --bin-dir build/bin "$@" "${extra[@]}"
