#!/usr/bin/env bash
# The whole test suite: install what is missing, build the normal and the
# ASan + UBSan trees, run every test in both, then every fuzz target for a
# few seconds. The GPU tests (label gpu) run too: without a usable GPU they
# exit 77 and ctest lists them as Skipped, with the reason in their output
# (ctest -V -L gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
jobs=$(nproc)
echo "== build (release)"
./scripts/build.sh build -DCMAKE_BUILD_TYPE=Release
echo "== build (asan+ubsan)"
./scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=Debug -DPS_SANITIZE=ON
status=0
echo "== tests (release)"
(cd build && ctest --output-on-failure -j "$jobs") || status=1
echo "== tests (asan+ubsan)"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:protect_shadow_gap=0 \
   UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
   ctest --output-on-failure -j "$jobs") || status=1
# A bounded run of every fuzz target (6 s each, about a minute in all):
# scripts/fuzz.sh builds build-fuzz with clang and fails on a crash.
echo "== fuzz (6 s a target)"
if command -v clang >/dev/null &&
   echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' |
     clang -fsanitize=fuzzer -x c - -o /dev/null 2>/dev/null; then
  ./scripts/fuzz.sh 6 || status=1
else
  echo "fuzz: SKIPPED: clang or its libFuzzer is not installed (scripts/install-deps.sh" \
       "installs clang and libclang-rt-14-dev)"
fi
[ $status -eq 0 ] && echo "all test suites passed" || echo "some tests FAILED"
exit $status
