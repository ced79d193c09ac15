#!/usr/bin/env bash
# GPU check in one run, for the GPU machine (see docs/GPU_MACHINE.md):
#   scripts/gpu-check.sh OUTDIR
# Probes the machine (OS, glibc, nvidia-smi, nvcc, NCCL), configures and
# builds the GPU-only tree (-DPS_GPU_ONLY=ON: the CUDA device, the model, the
# GPU tests and bench/train_gpu; no Debian libraries needed) against the
# NCCL it finds, runs the GPU tests and the GPU benchmark, and writes
# everything under OUTDIR, 8 files (what the device tool brings back):
# gpu-check.log (every step, its time and exit code), summary.txt (one line
# per step), facts.txt, build.log (configure and build), gpu-tests.log,
# sanitizer.log (compute-sanitizer memcheck of test_cuda_grad),
# train_gpu.log and train_gpu.jsonl. A failed step is recorded and the next runs; the exit
# code is the number of failed steps. Device time is scarce: every step has
# a timeout, and the whole script a budget (GPU_CHECK_BUDGET_S, default 480):
# a step never runs past it (its limit shrinks; with under 20 s left it is
# skipped), so a 540-s command always ends with its results written. On this
# machine a test that cannot use the GPU fails instead of skipping
# (PS_REQUIRE_GPU=1). Environment: BUILD_DIR (default /tmp/pstrain-gpu-build),
# NCCL_ROOT, CUDACXX (nvcc), CUDA_ARCHS (default 90), BENCH_STEPS (200).
set -u
cd "$(dirname "$0")/.."
src=$(pwd)
out=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
build=${BUILD_DIR:-/tmp/pstrain-gpu-build}
log="$out/gpu-check.log"
summary="$out/summary.txt"
facts="$out/facts.txt"
rm -f "$out"/*.log "$out"/*.jsonl
: >"$log"
: >"$summary"
: >"$facts"
failed=0
t_begin=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-480}
export PS_REQUIRE_GPU=${PS_REQUIRE_GPU:-1} NCCL_SOCKET_IFNAME=lo NCCL_DEBUG=WARN

say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$log"; }
fact() { echo "$*" | tee -a "$facts" >>"$log"; }

# step NAME TIMEOUT_S CMD...: run CMD with its output appended to
# OUTDIR/NAME.log (OUTDIR/$STEP_LOG.log if STEP_LOG is set).
step() {
  local name=$1 limit=$2
  shift 2
  local file="$out/${STEP_LOG:-$name}.log"
  local left=$((budget - ($(date +%s) - t_begin)))
  if [ $left -lt 20 ]; then
    say "== $name: skipped (the script's budget of ${budget}s is spent)"
    echo "$name skipped: budget spent" >>"$summary"
    failed=$((failed + 1))
    return 1
  fi
  [ "$limit" -gt $left ] && limit=$left
  say "== $name (limit ${limit}s): $*"
  echo "== $name: $*" >>"$file"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$file" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  tail -n 15 "$file" | sed 's/^/    /' >>"$log"
  if [ $rc -eq 0 ]; then
    say "   $name: ok (${dt}s)"
    echo "$name ok ${dt}s" >>"$summary"
  else
    [ $rc -eq 124 ] && say "   $name: TIMED OUT after ${limit}s" || say "   $name: FAILED rc=$rc (${dt}s)"
    echo "$name FAILED rc=$rc ${dt}s" >>"$summary"
    failed=$((failed + 1))
  fi
  return $rc
}

skip() {
  say "== $1: skipped ($2)"
  echo "$1 skipped: $2" >>"$summary"
}

# ---- facts ------------------------------------------------------------------
say "gpu-check: source $src, output $out, build $build"
fact "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
fact "git: $(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$src" status --porcelain 2>/dev/null | wc -l) changed files"
fact "os: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME" || uname -s)"
fact "kernel: $(uname -r) $(uname -m)"
fact "glibc: $(ldd --version 2>/dev/null | head -1)"
fact "cpus: $(nproc)  memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
fact "cc: $(cc --version 2>/dev/null | head -1)"
fact "cmake: $(cmake --version 2>/dev/null | head -1)"
fact "python3: $(python3 --version 2>&1)"
if command -v nvidia-smi >/dev/null; then
  timeout 10 nvidia-smi >>"$facts" 2>&1 || fact "nvidia-smi: failed rc=$?"
else
  fact "nvidia-smi: not found"
fi
fact "gpu: $(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -4 | tr '\n' ';')"
fact "driver cuda: $(timeout 10 nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -1)"

# nvcc: $CUDACXX, the PATH, the usual prefixes.
nvcc=${CUDACXX:-}
[ -z "$nvcc" ] && nvcc=$(command -v nvcc 2>/dev/null || true)
if [ -z "$nvcc" ]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc /usr/bin/nvcc \
           $(timeout 10 python3 -c 'import site; [print(p + "/nvidia/cu13/bin/nvcc", p + "/nvidia/cuda_nvcc/bin/nvcc") for p in site.getsitepackages()]' 2>/dev/null); do
    [ -x "$c" ] && { nvcc=$c; break; }
  done
fi
fact "nvcc: ${nvcc:-not found} $([ -n "$nvcc" ] && "$nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*, V[0-9.]*')"
cuda_root=""
[ -n "$nvcc" ] && cuda_root=$(cd "$(dirname "$nvcc")/.." && pwd)

# NCCL: $NCCL_ROOT, CUDA's own, then a Python install's (PyTorch pulls in
# nvidia-nccl-cu*: site-packages/nvidia/nccl/{include,lib}), then a search.
nccl_root=""
has_nccl() { [ -f "$1/include/nccl.h" ] && ls "$1"/lib*/libnccl.so* >/dev/null 2>&1; }
for c in ${NCCL_ROOT:-} $cuda_root /usr/local/cuda /usr; do
  [ -n "$c" ] && has_nccl "$c" && { nccl_root=$c; break; }
done
if [ -z "$nccl_root" ]; then
  for c in $(timeout 10 python3 -c 'import site, sys
for p in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    print(p + "/nvidia/nccl"); print(p + "/nvidia/cu13"); print(p + "/nvidia/cu12")' 2>/dev/null); do
    has_nccl "$c" && { nccl_root=$c; break; }
  done
fi
if [ -z "$nccl_root" ]; then
  h=$(timeout 20 find /usr /opt /root /home -xdev \( -path /proc -o -path /sys \) -prune -o -name nccl.h -print 2>/dev/null | head -1)
  [ -n "$h" ] && has_nccl "$(dirname "$(dirname "$h")")" && nccl_root=$(dirname "$(dirname "$h")")
fi
if [ -n "$nccl_root" ]; then
  v=$(awk '/#define NCCL_(MAJOR|MINOR|PATCH)/ {printf "%s%s", sep, $3; sep="."}' "$nccl_root/include/nccl.h")
  fact "nccl: $nccl_root (nccl.h $v; $(ls "$nccl_root"/lib*/libnccl.so* 2>/dev/null | tr '\n' ' '))"
else
  fact "nccl: not found (test_nccl will skip)"
fi
fact "torch: $(timeout 15 python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else "?", "gpus", torch.cuda.device_count())' 2>&1 | tail -1)"
# cuBLAS (worker/CMakeLists.txt links CUDA::cublas): its header and library.
fact "cublas: header $(ls "$cuda_root"/include/cublas_v2.h "$cuda_root"/targets/*/include/cublas_v2.h 2>/dev/null | head -1 || true); lib $(ls "$cuda_root"/lib*/libcublas.so* "$cuda_root"/targets/*/lib/libcublas.so* 2>/dev/null | head -1 || true)"
fact "ninja: $(command -v ninja || echo "not found (CMake's default generator: make)")"
fact "budget: ${budget}s for every step together"

# ---- configure and build ----------------------------------------------------
# PS_WERROR=OFF: another compiler's new warnings must not cost the run.
gen=()
command -v ninja >/dev/null && gen=(-G Ninja) # CMake's default needs make, which may be absent.
cfg=("${gen[@]}" -S "$src" -B "$build" -DPS_GPU_ONLY=ON -DPS_WITH_CUDA=ON -DCMAKE_BUILD_TYPE=Release
     -DPS_WERROR=OFF "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90}")
[ -n "$nvcc" ] && cfg+=("-DCMAKE_CUDA_COMPILER=$nvcc")
[ -n "$nccl_root" ] && cfg+=("-DNCCL_ROOT=$nccl_root")
# The runtime libraries the tests load: NCCL's, and the toolkit's own (cudart, cuBLAS) where
# the system does not list them, including a pip-installed toolkit's nvidia/*/lib folders.
libdirs=""
[ -n "$nccl_root" ] && libdirs="$nccl_root/lib"
if [ -n "$cuda_root" ]; then
  for d in "$cuda_root"/lib64 "$cuda_root"/lib "$cuda_root"/targets/*/lib "$cuda_root"/../*/lib; do
    [ -d "$d" ] || continue
    d=$(cd "$d" && pwd -P)
    case ":$libdirs:" in *":$d:"*) continue ;; esac
    ls "$d"/libcudart.so* "$d"/libcublas.so* >/dev/null 2>&1 && libdirs="$libdirs:$d"
  done
fi
libdirs=${libdirs#:}
[ -n "$libdirs" ] && export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fact "LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-}"
rm -rf "$build"
built=0
if STEP_LOG=build step configure 45 cmake "${cfg[@]}"; then
  grep -E "CUDA backend|NCCL" "$out/build.log" >>"$facts"
  STEP_LOG=build step build 120 cmake --build "$build" -j "$(nproc)" && built=1
else
  skip build "configure failed"
fi

# ---- tests and benchmark ----------------------------------------------------
if [ $built -eq 1 ]; then
  fact "linked: $(ldd "$build/tests/test_nccl" 2>/dev/null | grep -E 'cudart|cublas|nccl' | awk '{print $1 " -> " $3}' | tr '\n' ' ')"
  # A library the loader cannot find makes every test exit 127: say which, before the tests.
  missing=$(for t in "$build"/tests/test_* "$build/bench/train_gpu"; do ldd "$t" 2>/dev/null; done |
            grep 'not found' | sort -u | tr -s ' \t' ' ' | tr '\n' ';')
  fact "libraries not found: ${missing:-none}"
  [ -n "$missing" ] && say "   libraries not found: $missing (the tests will fail with 127)"
  step gpu-tests 100 ctest --test-dir "$build" -L gpu -V
  grep -E "^[0-9]+/[0-9]+ Test|tests passed|Skipped|SKIP" "$out/gpu-tests.log" >>"$log" 2>/dev/null
  [ -f "$out/gpu-tests.log" ] && echo "gpu-tests: $(grep -cE '^[0-9]+/[0-9]+ Test .*Passed' "$out/gpu-tests.log") passed, $(grep -cE '^[0-9]+/[0-9]+ Test .*Skipped' "$out/gpu-tests.log") skipped, $(grep -cE '^[0-9]+/[0-9]+ Test .*(Failed|Timeout|Exception)' "$out/gpu-tests.log") failed" | tee -a "$log" >>"$summary"
  # The kernels have never run before this script: memcheck the gradient
  # test once (out-of-bounds accesses, misaligned or invalid addresses).
  sanitizer=$(command -v compute-sanitizer 2>/dev/null || true)
  [ -z "$sanitizer" ] && [ -n "$cuda_root" ] && [ -x "$cuda_root/bin/compute-sanitizer" ] &&
    sanitizer=$cuda_root/bin/compute-sanitizer
  if [ -n "$sanitizer" ]; then
    step sanitizer 60 "$sanitizer" --tool memcheck --error-exitcode 99 "$build/tests/test_cuda_grad"
  else
    skip sanitizer "compute-sanitizer not found"
  fi
  step train_gpu 60 "$build/bench/train_gpu" --steps "${BENCH_STEPS:-200}" --cpu-steps 5
  grep '^{' "$out/train_gpu.log" >"$out/train_gpu.jsonl" 2>/dev/null
else
  skip gpu-tests "no build"
  skip train_gpu "no build"
fi

say "gpu-check: done in $(($(date +%s) - t_begin))s, $failed failed step(s)"
cat "$summary" | tee -a "$log"
exit $failed
