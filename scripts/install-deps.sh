#!/usr/bin/env bash
# Install the Debian 12 packages the project needs to build, test and run
# (or, given package names, those instead: bench/allreduce.sh asks for Open
# MPI). Installs only what is missing; safe to run again. Needs root (or
# sudo) when something is missing. Not installed here: the CUDA toolkit
# (nvcc, cuBLAS, NCCL) of the GPU backend; CMake builds it whenever nvcc is
# on the PATH or CUDACXX names it (PS_WITH_CUDA=AUTO), and the build works
# without it.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config   # toolchain
  libopenblas-dev                    # CPU GEMM (worker device backend)
  libjansson-dev                     # JSON: summaries, TF_CONFIG
  libmicrohttpd-dev                  # HTTP: psserver --metrics-listen (Prometheus)
  prometheus                         # tests: promtool check metrics, a real scrape
  zlib1g-dev                         # gzip'd IDX files
  libcmocka-dev                      # unit tests
  libxxhash-dev                      # checkpoint checksums (XXH64)
  libleveldb-dev                     # checkpoint store (storage/st_store.c)
  libgrpc-dev                        # gRPC C core: PS <-> worker RPC (proto/rpc.c)
  libprotobuf-c-dev protobuf-c-compiler  # proto/ps.proto messages (protoc-c at build time)
  clang libclang-rt-14-dev           # fuzz/: libFuzzer, clang's ASan/UBSan (scripts/fuzz.sh)
  python3                            # integration test drivers, experiment scripts
  python3-numpy                      # the Python client package (python/pstrain) and its test
  python3-venv python3-pip python3-setuptools  # its test: pip install from the source tree
  openssl                            # tests and psbench --security tls: a throwaway CA
  dataset-fashion-mnist              # the training data
  iproute2                           # ip netns, tc: the emulated cluster (scripts/experiments/netcluster.py)
  python3-yaml python3-jsonschema systemd  # tests: the deploy/ manifests and units, checked offline
)
[ $# -gt 0 ] && PACKAGES=("$@")

missing=()
for p in "${PACKAGES[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root: apt-get install ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
