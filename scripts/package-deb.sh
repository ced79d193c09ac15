#!/usr/bin/env bash
# scripts/package-deb.sh [BUILD_DIR]: a Release build in BUILD_DIR (default
# build-deb) packaged as a Debian package with CPack: psserver, pstrain, psctl,
# libpstrain.so and libpstrain.a, pstrain/pstrain.h and pstrain.pc under /usr,
# depending on the Debian runtime packages they need (dpkg-shlibdeps). Prints
# the .deb's path. Install it with: apt-get install ./BUILD_DIR/pstrain_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build-deb}
./scripts/install-deps.sh
./scripts/build.sh "$dir" -DCMAKE_BUILD_TYPE=Release
rm -f "$dir"/pstrain_*.deb
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! (cd "$dir" && cpack -G DEB) >"$log" 2>&1; then
  cat "$log" >&2
  echo "package-deb: cpack failed in $dir" >&2
  exit 1
fi
ls "$dir"/pstrain_*.deb
