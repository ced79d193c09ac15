#!/usr/bin/env bash
# The main job: install what is missing, build, and train the MLP on
# Fashion-MNIST, printing progress and the final test accuracy.
#   ./scripts/run-local.sh [--mode local] [pstrain options...]   (--help lists them)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh build -DCMAKE_BUILD_TYPE=Release
exec ./build/bin/pstrain "$@"
