#!/usr/bin/env bash
# The main job: install what is missing, build, and train the MLP on
# Fashion-MNIST on a local cluster (2 PS + 2 workers on 127.0.0.1 by
# default), printing progress and the final test accuracy.
#   ./scripts/run-local.sh [--mode ps|local] [--ps N] [--workers N] [pstrain options...]
#   ./scripts/run-local.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh build -DCMAKE_BUILD_TYPE=Release
exec python3 scripts/launch.py --bin-dir build/bin "$@"
