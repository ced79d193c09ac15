#!/usr/bin/env bash
# Fuzzing: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#           scripts/fuzz.sh --seeds   (rewrite the generated seeds of fuzz/corpus/)
#
# Builds the libFuzzer targets of fuzz/ in build-fuzz (clang, ASan + UBSan)
# and runs each one (default: all of them) for SECONDS_PER_TARGET (default
# 60) on its committed seeds, fuzz/corpus/<target>/, plus the inputs earlier
# runs found, build-fuzz/corpus/<target>/ (where new ones go). Prints per
# target the executions, the final coverage (libFuzzer's cov and ft) and the
# crashes; exits 1 on a crash, naming the reproducer (build-fuzz/artifacts/),
# which runs again as: build-fuzz/fuzz/<target> <reproducer>.
# FUZZ_JOBS=N runs N targets at a time (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v clang >/dev/null || { echo "fuzz.sh: clang is missing (scripts/install-deps.sh installs it)" >&2; exit 2; }
build=build-fuzz
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { CC=clang cmake -S . -B "$build" -DPS_FUZZ=ON -DPS_WITH_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug \
         -DCMAKE_C_FLAGS=-O2 && cmake --build "$build" --target fuzz_all -j "$(nproc)"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "fuzz.sh: build failed in $build" >&2
  exit 1
fi

if [ "${1:-}" = "--seeds" ]; then
  tmp=$(mktemp -d)
  "$build/fuzz/gen_seeds" "$tmp"
  for d in "$tmp"/*/; do
    t=$(basename "$d")
    mkdir -p "fuzz/corpus/$t"
    cp "$d"* "fuzz/corpus/$t/"
  done
  rm -rf "$tmp"
  echo "fuzz.sh: seeds written to fuzz/corpus/"
  exit 0
fi

secs=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(fuzz_ps_server fuzz_ps_durable fuzz_wire fuzz_store fuzz_tf_config fuzz_idx
           fuzz_criteo fuzz_ring fuzz_rendezvous)
fi

# One target: its summary line on stdout, its log in $build/logs/<target>.log.
run_one() {
  local t=$1 out="$build/logs/$t.log" extra=()
  mkdir -p "$build/corpus/$t" "$build/artifacts/$t" "$build/logs"
  # Scratch files (the store target's LevelDB) in memory when possible.
  local base=/dev/shm tmp
  [ -d /dev/shm ] && [ -w /dev/shm ] || base="$build"
  tmp=$(mktemp -d "$base/psfuzz-$t.XXXXXX")
  [ -f "fuzz/$t.dict" ] && extra+=("-dict=fuzz/$t.dict")
  # LevelDB's caches and memtables (the store, the durable PS) keep what
  # an input allocated, so every
  # input would pay a whole-heap leak scan (5 times slower): leaks are
  # looked for at exit only there.
  case $t in fuzz_store | fuzz_ps_durable) extra+=("-detect_leaks=0") ;; esac
  local rc=0
  FUZZ_TMPDIR="$tmp" "$build/fuzz/$t" -max_total_time="$secs" -close_fd_mask=2 \
    -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="$build/artifacts/$t/" "${extra[@]}" \
    "$build/corpus/$t" "fuzz/corpus/$t" >"$out" 2>&1 || rc=$?
  rm -rf "$tmp"
  local execs cov ft corp
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$out" | tail -1 | cut -d' ' -f2)
  ft=$(grep -oE 'ft: [0-9]+' "$out" | tail -1 | cut -d' ' -f2)
  corp=$(grep -oE 'corp: [0-9]+' "$out" | tail -1 | cut -d' ' -f2)
  if [ $rc -eq 0 ]; then
    printf '%-16s %10s execs in %ss  cov %-5s ft %-6s corpus %-5s crashes 0\n' \
      "$t" "${execs:-?}" "$secs" "${cov:-?}" "${ft:-?}" "${corp:-?}"
  else
    local art
    art=$(grep -oE "Test unit written to [^ ]+" "$out" | tail -1 | cut -d' ' -f5)
    printf '%-16s CRASH (exit %d) after %s execs: reproducer %s; log %s\n' \
      "$t" "$rc" "${execs:-?}" "${art:-none}" "$out"
    grep -E 'ERROR|SUMMARY|runtime error|rpc_stub:|fuzz_' "$out" | head -5 | sed 's/^/    /'
    return 1
  fi
}

status=0
jobs=${FUZZ_JOBS:-1}
mkdir -p "$build/logs"
pids=()
for t in "${targets[@]}"; do
  if [ "$jobs" -le 1 ]; then
    run_one "$t" || status=1
  else
    run_one "$t" > "$build/logs/$t.summary" &
    pids+=($!)
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  fi
done
if [ "$jobs" -gt 1 ]; then
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  for t in "${targets[@]}"; do cat "$build/logs/$t.summary"; done
fi
[ $status -eq 0 ] && echo "fuzz.sh: no crash in ${#targets[@]} targets" || echo "fuzz.sh: CRASH found"
exit $status
